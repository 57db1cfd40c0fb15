"""The conformance probe: runs INSIDE the sandbox, standard library only.

    python3 -I -c "<this file>" '<config JSON>'

The config names the checks to run (attack ids) and what they need (canary ports, the
host's addresses, the limits the policy promises, ...). Each check attempts its attack
and prints one line

    @@airlock-conformance@@ {"id": ..., "escaped": true|false|null, "observed": "...", ...}

`escaped` is this side's verdict; the host adds what only it can see (canary hits, the
host's files after the run, the event log) before the final verdict.

Rules this file keeps:
- Network: it only ever sends to the host's own addresses (passed in), loopback, and
  the loopback ports of the run's bridges. "Unreachable" for anything else (cloud
  metadata) is proven by routes and a UDP connect(), which is a route lookup and sends
  nothing. The system resolver is only asked when the sandbox has no interface but lo.
- Anything that could be killed by seccomp runs in a forked child, so one kill cannot
  cost the other checks their results.
- Nothing it opens for writing under /proc, /sys or /run/airlock is ever written to.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import platform
import re
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

MARK = "@@airlock-conformance@@ "
Result = dict[str, Any]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_NR = {
    "x86_64": {
        "clone": 56, "ptrace": 101, "setuid": 105, "setgid": 106, "setresuid": 117,
        "personality": 135, "mount": 165, "keyctl": 250, "request_key": 249, "unshare": 272,
        "perf_event_open": 298, "process_vm_readv": 310, "bpf": 321, "userfaultfd": 323,
        "io_uring_setup": 425, "socket": 41, "socketpair": 53, "prctl": 157,
    },
    "aarch64": {
        "clone": 220, "ptrace": 117, "setuid": 146, "setgid": 144, "setresuid": 147,
        "personality": 92, "mount": 40, "keyctl": 219, "request_key": 218, "unshare": 97,
        "perf_event_open": 241, "process_vm_readv": 270, "bpf": 280, "userfaultfd": 282,
        "io_uring_setup": 425, "socket": 198, "socketpair": 199, "prctl": 167,
    },
}
NR = _NR.get(platform.machine(), _NR["x86_64"])

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
CLONE_NEWIPC, CLONE_NEWUTS = 0x08000000, 0x04000000


# -- helpers ---------------------------------------------------------------------------


def ename(code: int | None) -> str:
    return errno.errorcode.get(code or 0, str(code))


def res(escaped: bool | None, observed: str, **detail: Any) -> Result:
    return {"escaped": escaped, "observed": observed, **detail}


def sc(name: str, *args: Any) -> int | str:
    """A raw syscall: its return value, or the errno's name."""
    conv = [a if isinstance(a, ctypes._SimpleCData | ctypes.Array) else ctypes.c_long(a)
            for a in args]
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(NR[name]), *conv)
    return int(ret) if ret >= 0 else ename(ctypes.get_errno())


def ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def child(fn: Callable[[], Any], timeout: int = 10) -> Any:
    """fn() in a forked child; its JSON result, or how the child died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            signal.alarm(timeout)
            try:
                out = fn()
            except BaseException as exc:
                out = f"error {type(exc).__name__}: {exc}"
            os.write(w, json.dumps(out, default=str).encode()[:60000])
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if chunks:
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            return "error: garbled child result"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"child exited {os.WEXITSTATUS(status)}"


def summary(results: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in results.items())


def status_fields() -> dict[str, str]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def interfaces() -> list[str]:
    with open("/proc/net/dev", encoding="ascii") as fh:
        return [ln.split(":", 1)[0].strip() for ln in fh.readlines()[2:] if ":" in ln]


def routes_off_lo() -> list[str]:
    out = []
    try:
        with open("/proc/net/route", encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                p = line.split()
                if p and p[0] != "lo":
                    out.append(f"v4 {p[0]} dst={p[1]} mask={p[7]}")
    except OSError:
        pass
    try:
        with open("/proc/net/ipv6_route", encoding="ascii") as fh:
            for line in fh:
                p = line.split()
                if p and p[-1] != "lo":
                    out.append(f"v6 {p[-1]} dst={p[0]}/{int(p[1], 16)}")
    except OSError:
        pass
    return out


def isolated() -> bool:
    """Only loopback: the one state in which asking the system resolver sends nothing."""
    try:
        return interfaces() == ["lo"] and not routes_off_lo()
    except OSError:
        return False


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_try(addr: str, port: int, hello: bytes, timeout: float = 2.0) -> str:
    """Connect; on success send `hello` and read what answers (a canary banner)."""
    s = socket.socket(family_of(addr), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return ename(exc.errno)
    try:
        s.sendall(hello + b"\n")
        banner = s.recv(200)
    except OSError as exc:
        banner = f"<{ename(exc.errno)}>".encode()
    finally:
        s.close()
    return "connected: " + banner.decode("latin-1").strip()[:80]


def udp_try(addr: str, port: int, payload: bytes) -> str:
    s = socket.socket(family_of(addr), socket.SOCK_DGRAM)
    try:
        s.sendto(payload, (addr, port))
        return "sent"
    except OSError as exc:
        return ename(exc.errno)
    finally:
        s.close()


_WALK_CACHE: dict[str, list[tuple[str, os.stat_result]]] = {}


def walk_root() -> list[tuple[str, os.stat_result]]:
    """One bounded walk of the whole tree, shared by the checks that search it."""
    if "/" not in _WALK_CACHE:
        _WALK_CACHE["/"] = walk(["/"], limit_s=8.0)
    return _WALK_CACHE["/"]


def walk(roots: list[str], skip: tuple[str, ...] = ("/proc", "/sys", "/dev"),
         limit_s: float = 6.0, limit_n: int = 200_000) -> list[tuple[str, os.stat_result]]:
    """lstat of everything under roots (not following links), bounded in time and count."""
    out: list[tuple[str, os.stat_result]] = []
    seen: set[str] = set()
    deadline = time.monotonic() + limit_s
    stack = list(roots)
    while stack and time.monotonic() < deadline and len(out) < limit_n:
        path = stack.pop()
        if path in seen or (path != "/" and path.startswith(skip)) or path in skip:
            continue
        seen.add(path)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        out.append((path, st))
        if stat.S_ISDIR(st.st_mode):
            try:
                names = os.listdir(path)
            except OSError:
                continue
            base = path.rstrip("/")
            stack.extend(f"{base}/{n}" for n in names)
    return out


def tokens_in_system(prefix: str, roots: list[str]) -> dict[str, list[str]]:
    """Every `prefix` + 32 hex token in the environment, any process's environ and
    cmdline, and the regular files under roots: token -> where it was found."""
    pattern = re.compile(re.escape(prefix).encode() + rb"[0-9a-f]{32}")
    found: dict[str, list[str]] = {}

    def scan(data: bytes, where: str) -> None:
        for m in pattern.finditer(data):
            found.setdefault(m.group().decode(), []).append(where)

    scan("\0".join(f"{k}={v}" for k, v in os.environ.items()).encode(), "env")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as fh:
                    scan(fh.read(1 << 20), f"/proc/{pid}/{name}")
            except OSError:
                pass
    for path, st in walk(roots, limit_s=4.0):
        if stat.S_ISREG(st.st_mode) and st.st_size <= 2 << 20:
            try:
                with open(path, "rb") as fh:
                    scan(fh.read(), path)
            except OSError:
                pass
    return found


def open_for_write(path: str) -> str:
    """Open without creating or writing anything; 'opened' means it was writable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError as exc:
        return ename(exc.errno)
    os.close(fd)
    return "opened"


def create_file(path: str) -> str:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        return ename(exc.errno)
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass
    return "created"


def mountinfo() -> list[list[str]]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        return [line.split() for line in fh]


def mount_options(target: str) -> str | None:
    for parts in mountinfo():
        if len(parts) > 5 and parts[4] == target:
            return parts[5]
    return None


# -- network ---------------------------------------------------------------------------


def net_interfaces(cfg: dict) -> Result:
    ifaces, routes = interfaces(), routes_off_lo()
    esc = ifaces != ["lo"] or bool(routes)
    return res(esc, f"interfaces={','.join(ifaces)}; routes off lo: {'; '.join(routes) or 'none'}")


def _host_tcp(cfg: dict, addrs: list[str], aid: str) -> Result:
    port = cfg["canary"][aid]
    out = {a: tcp_try(a, port, aid.encode()) for a in addrs}
    if not out:
        return res(False, "no address to try")
    esc = any(v.startswith("connected") for v in out.values())
    return res(esc, summary(out))


def net_host_tcp(cfg: dict) -> Result:
    return _host_tcp(cfg, [a for a in cfg["host_addrs"] if ":" not in a], "net.host-tcp")


def net_host_ipv6(cfg: dict) -> Result:
    addrs = [a for a in cfg["host_addrs"] if ":" in a]
    addrs += [f"::ffff:{a}" for a in cfg["host_addrs"] if ":" not in a][:2]
    return _host_tcp(cfg, addrs, "net.host-ipv6")


def net_loopback_canary(cfg: dict) -> Result:
    aid = "net.loopback-canary"
    port = cfg["canary"][aid]
    out = {a: tcp_try(a, port, aid.encode()) for a in ("127.0.0.1", "::1")}
    # Something in the sandbox's own loopback could answer; only the canary's banner
    # says the connection reached the host.
    esc = any("airlock-canary" in v for v in out.values())
    return res(esc, summary(out))


def net_udp(cfg: dict) -> Result:
    aid = "net.udp"
    port = cfg["canary"][aid]
    out = {a: udp_try(a, port, aid.encode()) for a in cfg["host_addrs"]}
    return res(any(v == "sent" for v in out.values()), summary(out) or "no address to try")


def _dns_query(name: str) -> bytes:
    header = struct.pack(">HHHHHH", 0x4152, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def net_dns_resolve(cfg: dict) -> Result:
    servers = []
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as fh:
            servers = [ln.split()[1] for ln in fh if ln.startswith("nameserver") and len(ln.split()) > 1]
    except OSError as exc:
        servers = [f"<{ename(exc.errno)}>"]
    name = f"{cfg['nonce']}.dns.airlock-conformance.invalid"
    if not isolated():
        # Asking the system resolver here could send a query off this machine.
        lookup = "not asked (the sandbox has an interface besides lo)"
        resolved = False
    else:
        try:
            socket.getaddrinfo(name, 80)
            lookup, resolved = "resolved", True
        except socket.gaierror as exc:
            lookup, resolved = f"gaierror {exc.errno} ({exc.strerror})", False
    esc = bool(servers) or resolved
    return res(esc, f"nameservers={servers or 'none'}; lookup: {lookup}")


def net_dns_exfil(cfg: dict) -> Result:
    aid = "net.dns-exfil"
    port = cfg["canary"][aid]
    query = _dns_query(f"{cfg['nonce']}.exfil.airlock-conformance.invalid")
    out = {f"{a}:{port}": udp_try(a, port, query) for a in cfg["host_addrs"]}
    # The sandbox's own loopback resolvers (glibc's default, Docker's embedded DNS), only
    # while loopback is all there is: a shared network's loopback resolver would forward.
    for a in ("127.0.0.1", "127.0.0.11") if isolated() else ():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        try:
            s.sendto(query, (a, 53))
            s.recv(512)
            out[f"{a}:53"] = "answered"
        except TimeoutError:
            out[f"{a}:53"] = "no answer"
        except OSError as exc:
            out[f"{a}:53"] = ename(exc.errno)
        finally:
            s.close()
    esc = any(v in ("sent", "answered") for k, v in out.items() if not k.startswith("127."))
    esc = esc or any(v == "answered" for v in out.values())
    return res(esc, summary(out))


def net_bridge_gateway(cfg: dict) -> Result:
    aid = "net.bridge-gateway"
    port = cfg["canary"][aid]
    addrs = cfg.get("bridge_gateways") or []
    out = {}
    for a in addrs:
        out[f"tcp {a}"] = tcp_try(a, port, aid.encode())
        out[f"udp {a}"] = udp_try(a, port, aid.encode())
    esc = any(v.startswith("connected") or v == "sent" for v in out.values())
    return res(esc, summary(out) or "no bridge gateway on this engine")


def net_metadata_route(cfg: dict) -> Result:
    out = {}
    for addr in ("169.254.169.254", "fd00:ec2::254"):
        s = socket.socket(family_of(addr), socket.SOCK_DGRAM)
        try:
            # A UDP connect() is a route lookup: it sends no packet.
            s.connect((addr, 80))
            out[addr] = f"route exists (source {s.getsockname()[0]})"
        except OSError as exc:
            out[addr] = f"no route ({ename(exc.errno)})"
        finally:
            s.close()
    routes = routes_off_lo()
    esc = any(v.startswith("route exists") for v in out.values()) or bool(routes)
    return res(esc, summary(out) + f"; routes off lo: {len(routes)}")


def net_raw_socket(cfg: dict) -> Result:
    def attempt() -> dict:
        out = {}
        for label, fam, typ, proto in (("inet raw icmp", 2, 3, 1), ("inet6 raw icmpv6", 10, 3, 58),
                                       ("packet raw", 17, 3, 0x0300)):
            r = sc("socket", fam, typ, proto)
            out[label] = "created" if ok(r) else r
            if ok(r):
                os.close(int(r))
        return out

    out = child(attempt)
    if not isinstance(out, dict):
        return res(False, str(out))
    return res(any(v == "created" for v in out.values()), summary(out))


# -- the proxy -------------------------------------------------------------------------


def proxy_exchange(cfg: dict, request: bytes, hello: bytes, timeout: float = 6.0) -> str:
    """Send one request to the run's proxy; the status line (and canary banner)."""
    port = cfg["proxy_port"]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
    except OSError as exc:
        s.close()
        return f"proxy unreachable ({ename(exc.errno)})"
    try:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            more = s.recv(4096)
            if not more:
                break
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not status.startswith("HTTP/"):
            # Not an HTTP answer at all: whatever came back came from somewhere else.
            return "raw: " + data.decode("latin-1")[:80]
        code = status.split(" ")[1] if " " in status else "?"
        m = re.search(rb"(?im)^x-airlock-reason:\s*(\S+)", head)
        reason = m.group(1).decode("latin-1") if m else ""
        if code == "200" and request.startswith(b"CONNECT"):
            s.sendall(hello + b"\n")
            try:
                banner = rest or s.recv(200)
            except OSError:
                banner = b""
            return f"200 tunnel: {banner.decode('latin-1').strip()[:60]}"
        if code != "200" and not reason:
            reason = rest.decode("latin-1").strip().replace("\n", " ")[:80]
        return f"{code} {reason}".strip()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error {ename(exc.errno)}"
    finally:
        s.close()


def _connect(target: str, host_header: str | None = None) -> bytes:
    host = host_header if host_header is not None else target
    return f"CONNECT {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def _proxy_verdict(out: dict[str, str]) -> Result:
    esc = any(v.startswith(("200", "raw:")) or "airlock-canary" in v for v in out.values())
    return res(esc, summary(out))


def _proxy_to_localhost(cfg: dict, aid: str) -> Result:
    """CONNECT to the attack's canary by the name localhost."""
    target = f"localhost:{cfg['canary'][aid]}"
    return _proxy_verdict({target: proxy_exchange(cfg, _connect(target), aid.encode())})


def proxy_disallowed_port(cfg: dict) -> Result:
    return _proxy_to_localhost(cfg, "proxy.disallowed-port")


def proxy_ip_literal(cfg: dict) -> Result:
    aid = "proxy.ip-literal"
    port = cfg["canary"][aid]
    targets = [f"127.0.0.1:{port}", f"[::1]:{port}", f"2130706433:{port}", f"0x7f.1:{port}"]
    targets += [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in cfg["host_addrs"][:3]]
    return _proxy_verdict({t: proxy_exchange(cfg, _connect(t), aid.encode()) for t in targets})


def proxy_private_name(cfg: dict) -> Result:
    return _proxy_to_localhost(cfg, "proxy.private-name")


def proxy_host_mismatch(cfg: dict) -> Result:
    aid = "proxy.host-mismatch"
    port = cfg["canary"][aid]
    target = f"localhost:{port}"
    other = f"other.airlock-conformance.invalid:{port}"
    out = {
        f"CONNECT {target} Host {other}": proxy_exchange(cfg, _connect(target, other),
                                                          aid.encode()),
        f"GET http://{target}/ Host {other}": proxy_exchange(
            cfg, f"GET http://{target}/{aid} HTTP/1.1\r\nHost: {other}\r\n"
                 "Connection: close\r\n\r\n".encode(), aid.encode()),
    }
    return _proxy_verdict(out)


def proxy_dns_exfil(cfg: dict) -> Result:
    aid = "proxy.dns-exfil"
    target = f"{cfg['nonce']}.exfil.airlock-conformance.invalid:443"
    out = {target: proxy_exchange(cfg, _connect(target), aid.encode())}
    # A refusal after a lookup (address-forbidden, resolve-failed) means the name
    # reached a resolver: that is the exfiltration, even without a tunnel.
    looked_up = any(("address-forbidden" in v or "resolve-failed" in v) for v in out.values())
    r = _proxy_verdict(out)
    r["escaped"] = bool(r["escaped"]) or looked_up
    return r


# -- filesystem ------------------------------------------------------------------------


def fs_root_write(cfg: dict) -> Result:
    out = {p: create_file(p) for p in ("/airlock-probe", "/etc/airlock-probe",
                                       "/usr/airlock-probe", "/var/airlock-probe",
                                       "/var/tmp/airlock-probe")}
    if not os.path.ismount("/workspace") and os.path.isdir("/workspace"):
        # The image's /workspace belongs to the sandbox user: only the read-only root
        # stands between it and a write.
        out["/workspace/.airlock-probe"] = create_file("/workspace/.airlock-probe")
    for p in ("/etc/hosts", "/etc/resolv.conf", "/etc/passwd"):
        out[f"{p} (append)"] = open_for_write(p)
    esc = any(v in ("created", "opened") for v in out.values())
    return res(esc, summary(out) + f"; / mounted {mount_options('/')}")


def fs_proc_sys(cfg: dict) -> Result:
    out = {p: open_for_write(p) for p in ("/proc/sys/kernel/core_pattern",
                                          "/proc/sys/kernel/modprobe", "/proc/sysrq-trigger")}
    return res(any(v == "opened" for v in out.values()),
               summary(out) + f"; /proc/sys mounted {mount_options('/proc/sys')}")


def fs_sys(cfg: dict) -> Result:
    paths = ["/sys/kernel/uevent_helper", "/sys/kernel/mm/transparent_hugepage/enabled",
             "/sys/kernel/mm/ksm/run", "/sys/fs/cgroup/pids/pids.max",
             "/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/pids.max",
             "/sys/fs/cgroup/memory.max"]
    out = {p: open_for_write(p) for p in paths if os.path.lexists(p)}
    esc = any(v == "opened" for v in out.values())
    return res(esc, summary(out) + f"; /sys mounted {mount_options('/sys')}")


def fs_proc_masked(cfg: dict) -> Result:
    out: dict[str, str] = {}
    for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
              "/proc/latency_stats", "/proc/timer_stats"):
        try:
            with open(p, "rb") as fh:
                data = fh.read(64)
            out[p] = f"read {len(data)} bytes" if data else "empty"
        except OSError as exc:
            out[p] = ename(exc.errno)
    try:
        names = os.listdir("/sys/firmware")
        out["/sys/firmware"] = f"{len(names)} entries" if names else "empty"
    except OSError as exc:
        out["/sys/firmware"] = ename(exc.errno)
    esc = any(v.startswith("read") or v.endswith(" entries") for v in out.values())
    return res(esc, summary(out))


def fs_mknod(cfg: dict) -> Result:
    dirs = [d for d in ("/tmp", os.path.expanduser("~"), "/dev/shm", "/workspace", "/var/tmp")
            if os.path.isdir(d)]
    # null is harmless to open; tun and fuse are kernel attack surface the sandbox has
    # no business reaching. Opening is all this does (nothing is written to tun/fuse).
    devices = (("null", 1, 3), ("tun", 10, 200), ("fuse", 10, 229))

    def attempt() -> dict:
        out = {}
        for d in dirs:
            got = []
            for name, major, minor in devices:
                path = f"{d}/airlock-probe-{name}"
                try:
                    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
                except OSError as exc:
                    got.append(f"{name} {ename(exc.errno)}")
                    if exc.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
                        break  # the same answer for every device
                    continue
                try:
                    os.close(os.open(path, os.O_RDWR))
                    got.append(f"{name} OPENED")
                except OSError as exc:
                    got.append(f"{name} created, open {ename(exc.errno)}")
                finally:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            out[d] = ", ".join(got)
        return out

    out = child(attempt)
    if not isinstance(out, dict):
        return res(False, str(out))
    return res(any("OPENED" in v for v in out.values()), summary(out))


def fs_exec_tmpfs(cfg: dict) -> Result:
    src = "/bin/true"
    with open(src, "rb") as src_fh:
        binary = src_fh.read()
    out = {}
    for d in [*cfg["limits"]["tmpfs"], "/dev/shm"]:
        path = f"{d}/airlock-probe-exec"
        try:
            with open(path, "wb") as fh:
                fh.write(binary)
            os.chmod(path, 0o755)
        except OSError as exc:
            out[d] = f"copy {ename(exc.errno)}"
            continue

        def run(p: str = path) -> Any:
            try:
                os.execv(p, [p])
            except OSError as exc:
                return ename(exc.errno)
            return "unreachable"

        r = child(run)
        out[d] = "executed" if r == "child exited 0" else str(r)
        try:
            os.unlink(path)
        except OSError:
            pass
    return res(any(v == "executed" for v in out.values()), summary(out))


def fs_shim_write(cfg: dict) -> Result:
    out = {
        "/opt/airlock/airlock_sandbox/shim.py (append)":
            open_for_write("/opt/airlock/airlock_sandbox/shim.py"),
        "/opt/airlock/airlock_sandbox/airlock-probe":
            create_file("/opt/airlock/airlock_sandbox/airlock-probe"),
        "/opt/airlock/airlock-probe": create_file("/opt/airlock/airlock-probe"),
    }
    return res(any(v in ("created", "opened") for v in out.values()), summary(out))


def fs_sockets_dir(cfg: dict) -> Result:
    d = "/run/airlock"
    out = {f"{d}/airlock-probe": create_file(f"{d}/airlock-probe")}
    try:
        os.symlink("/tmp", f"{d}/airlock-probe-link")
        os.unlink(f"{d}/airlock-probe-link")
        out["symlink"] = "created"
    except OSError as exc:
        out["symlink"] = ename(exc.errno)
    for name in ("shim.cfg", "control.sock"):
        if os.path.lexists(f"{d}/{name}"):
            if name.endswith(".sock"):
                # Replacing a socket would be the attack; a hardlink next to it shows
                # whether the directory takes new names without touching the socket.
                try:
                    os.link(f"{d}/{name}", f"{d}/airlock-probe-{name}")
                    os.unlink(f"{d}/airlock-probe-{name}")
                    out[f"link {name}"] = "created"
                except OSError as exc:
                    out[f"link {name}"] = ename(exc.errno)
            else:
                out[f"{name} (append)"] = open_for_write(f"{d}/{name}")
    esc = any(v in ("created", "opened") for v in out.values())
    return res(esc, summary(out) + f"; {d} mounted {mount_options(d)}")


def fs_workspace_symlink(cfg: dict) -> Result:
    ws = "/workspace"
    outside = cfg["outside"]["symlink_target"]
    out = {}
    for name, target in (("escape-link", outside), ("etc-link", "/etc/passwd"),
                         ("parent-link", "..")):
        try:
            os.symlink(target, f"{ws}/{name}")
            out[name] = "created"
        except OSError as exc:
            out[name] = ename(exc.errno)
    # Turn an existing file into a link to the host's file, hoping the host follows it.
    try:
        os.unlink(f"{ws}/notes.txt")
        os.symlink(outside, f"{ws}/notes.txt")
        out["notes.txt -> outside"] = "replaced"
    except OSError as exc:
        out["notes.txt -> outside"] = ename(exc.errno)
    try:
        with open(f"{ws}/escape-link", "a") as fh:
            fh.write(cfg["nonce"])
        out["write through escape-link"] = "written"
    except OSError as exc:
        out["write through escape-link"] = ename(exc.errno)
    # The host decides: it checks its own files after the run.
    return res(out["write through escape-link"] == "written", summary(out))


def fs_workspace_hardlink(cfg: dict) -> Result:
    ws = "/workspace"
    out = {}
    scratch = "/tmp/airlock-probe-hl"
    try:
        with open(scratch, "w") as fh:
            fh.write("x")
    except OSError:
        pass
    for src in ("/etc/passwd", "/opt/airlock/airlock_sandbox/shim.py", "/run/airlock/shim.cfg",
                scratch):
        name = f"{ws}/hl-{os.path.basename(src)}"
        try:
            os.link(src, name)
            out[f"link {src}"] = "linked"
        except OSError as exc:
            out[f"link {src}"] = ename(exc.errno)
    shared = []
    for path, st in walk([ws], limit_s=2.0):
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and "/hl-" not in path:
            shared.append(path)
            try:
                with open(path, "a") as fh:
                    fh.write(f"\n{cfg['nonce']}\n")
            except OSError as exc:
                out[f"append {path}"] = ename(exc.errno)
            else:
                out[f"append {path}"] = f"written (nlink {st.st_nlink})"
    out["files with nlink>1"] = str(len(shared))
    esc = any(v == "linked" for k, v in out.items() if scratch not in k)
    return res(esc, summary(out))


def fs_host_sockets(cfg: dict) -> Result:
    out = {}
    paths = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
             "/run/podman/podman.sock", cfg["decoy_socket"]]
    for p in paths:
        if not os.path.lexists(p):
            out[p] = "ENOENT"
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(p)  # nothing is ever sent
            out[p] = "connected"
        except OSError as exc:
            out[p] = f"exists, connect {ename(exc.errno)}"
        finally:
            s.close()
    esc = any(v != "ENOENT" for v in out.values())
    return res(esc, summary(out))


# -- privilege -------------------------------------------------------------------------


def priv_capabilities(cfg: dict) -> Result:
    st = status_fields()
    caps = {k: st.get(k, "-") for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    esc = any(v not in ("-", "") and int(v, 16) != 0 for v in caps.values())
    return res(esc, summary(caps))


def priv_setuid(cfg: dict) -> Result:
    def become_root() -> dict:
        return {"setuid(0)": sc("setuid", 0), "setresuid(0,0,0)": sc("setresuid", 0, 0, 0),
                "setgid(0)": sc("setgid", 0)}

    calls = child(become_root)
    found = []
    for path, st in walk_root():
        if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            found.append((path, st))
    nnp = child(lambda: sc("prctl", 39, 0, 0, 0, 0))
    tried = {}
    for path, st in found[:10]:
        if st.st_uid == 0 and st.st_mode & stat.S_ISUID and os.path.basename(path).startswith("python"):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover
                os.dup2(w, 1)
                try:
                    os.execv(path, [path, "-I", "-c", "import os; print(os.geteuid())"])
                finally:
                    os._exit(127)
            os.close(w)
            data = os.read(r, 100)
            os.close(r)
            os.waitpid(pid, 0)
            tried[path] = f"euid {data.decode().strip() or '?'}"
    esc = (isinstance(calls, dict) and any(ok(v) for v in calls.values())) or \
        any(v == "euid 0" for v in tried.values()) or \
        (nnp == 0 and any(st.st_uid == 0 and st.st_mode & stat.S_ISUID for _, st in found))
    observed = (f"{summary(calls) if isinstance(calls, dict) else calls}; "
                f"setuid/setgid files: {[p for p, _ in found][:5] or 'none'}; "
                f"no_new_privs={nnp}" + (f"; ran {summary(tried)}" if tried else ""))
    return res(bool(esc), observed)


def priv_no_new_privs(cfg: dict) -> Result:
    r = child(lambda: sc("prctl", 39, 0, 0, 0, 0))  # PR_GET_NO_NEW_PRIVS
    return res(r == 0, f"PR_GET_NO_NEW_PRIVS={r}")


def priv_seccomp_off(cfg: dict) -> Result:
    st = status_fields().get("Seccomp", "-")
    mode = child(lambda: sc("prctl", 21, 0, 0, 0, 0))  # PR_GET_SECCOMP
    esc = st == "0" or mode == 0
    return res(esc, f"/proc/self/status Seccomp={st}; PR_GET_SECCOMP={mode}")


def priv_unshare(cfg: dict) -> Result:
    out = {}
    for label, flags in (("NEWUSER", CLONE_NEWUSER), ("NEWNS", CLONE_NEWNS),
                         ("NEWNET", CLONE_NEWNET), ("NEWPID", CLONE_NEWPID),
                         ("NEWUSER|NEWNS|NEWNET", CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET),
                         ("NEWIPC|NEWUTS", CLONE_NEWIPC | CLONE_NEWUTS)):
        out[f"unshare({label})"] = child(functools.partial(sc, "unshare", flags))

    def clone_userns() -> Any:
        r = sc("clone", CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
        if r == 0:
            os._exit(0)
        if ok(r):
            os.waitpid(int(r), 0)
        return r

    out["clone(NEWUSER)"] = child(clone_userns)
    return res(any(ok(v) for v in out.values()), summary(out))


def priv_mount(cfg: dict) -> Result:
    target = "/tmp/airlock-probe-mnt"
    os.makedirs(target, exist_ok=True)

    def direct() -> Any:
        return sc("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(target.encode()),
                  ctypes.c_char_p(b"tmpfs"), 0, 0)

    def in_userns() -> Any:
        r = sc("unshare", CLONE_NEWUSER | CLONE_NEWNS)
        if not ok(r):
            return f"unshare {r}"
        return direct()

    def bind_root() -> Any:
        return sc("mount", ctypes.c_char_p(b"/"), ctypes.c_char_p(target.encode()),
                  ctypes.c_char_p(None), 0x1000, 0)  # MS_BIND

    out = {"mount tmpfs": child(direct), "bind /": child(bind_root),
           "unshare(NEWUSER|NEWNS) + mount": child(in_userns)}
    try:
        os.rmdir(target)
    except OSError:
        pass
    return res(any(ok(v) for v in out.values()), summary(out))


def priv_ptrace(cfg: dict) -> Result:
    out = {"PTRACE_TRACEME": child(lambda: sc("ptrace", 0, 0, 0, 0))}
    sibling = os.fork()
    if sibling == 0:  # pragma: no cover
        time.sleep(30)
        os._exit(0)
    try:
        def attach() -> Any:
            r = sc("ptrace", 16, sibling, 0, 0)  # PTRACE_ATTACH
            if ok(r):
                os.waitpid(sibling, 0)
                sc("ptrace", 17, sibling, 0, 0)  # PTRACE_DETACH
            return r

        out["PTRACE_ATTACH sibling"] = child(attach)
        buf = ctypes.create_string_buffer(8)
        local = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
        remote = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
        out["process_vm_readv"] = child(
            lambda: sc("process_vm_readv", os.getpid(), local, 1, remote, 1, 0))
    finally:
        os.kill(sibling, signal.SIGKILL)
        os.waitpid(sibling, 0)
    # The same access without the syscall: another process's memory through /proc.
    # Every process here but this one is someone else's: the init (PID 1), the shim.
    opened = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (os.getpid(), sibling):
            continue
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                comm = fh.read().strip()
        except OSError:
            comm = "?"
        for mode, label in ((os.O_RDWR, "read-write"), (os.O_RDONLY, "read-only")):
            try:
                os.close(os.open(f"/proc/{pid}/mem", mode))
            except OSError:
                continue
            opened.append(f"{pid} ({comm}) {label}")
            break
    out["/proc/<other pid>/mem"] = f"OPENED: {opened}" if opened else "none opened"
    esc = any(ok(v) for v in out.values()) or bool(opened)
    return res(esc, summary(out))


def priv_keyctl(cfg: dict) -> Result:
    out = {
        "keyctl(GET_KEYRING_ID, session)": child(lambda: sc("keyctl", 0, -3, 0)),
        "keyctl(GET_KEYRING_ID, user)": child(lambda: sc("keyctl", 0, -4, 0)),
        "request_key": child(lambda: sc("request_key", ctypes.c_char_p(b"user"),
                                        ctypes.c_char_p(b"airlock-probe"), ctypes.c_char_p(None),
                                        0)),
    }
    # ENOKEY means the kernel's keyring code ran: the call was not filtered.
    esc = any(ok(v) or v == "ENOKEY" for v in out.values())
    return res(esc, summary(out))


def priv_bpf(cfg: dict) -> Result:
    def attempt() -> Any:
        attr = (ctypes.c_uint32 * 32)()
        attr[0], attr[1], attr[2], attr[3] = 2, 4, 4, 1  # BPF_MAP_TYPE_ARRAY, 4, 4, 1
        return sc("bpf", 0, attr, 128)  # BPF_MAP_CREATE

    r = child(attempt)
    return res(ok(r), f"bpf(BPF_MAP_CREATE)={r}")


def priv_io_uring(cfg: dict) -> Result:
    def attempt() -> Any:
        params = ctypes.create_string_buffer(120)
        return sc("io_uring_setup", 1, params)

    r = child(attempt)
    return res(ok(r), f"io_uring_setup(1)={r}")


def priv_personality(cfg: dict) -> Result:
    out = {"ADDR_NO_RANDOMIZE": child(lambda: sc("personality", 0x0040000)),
           "READ_IMPLIES_EXEC": child(lambda: sc("personality", 0x0400000))}
    return res(any(ok(v) for v in out.values()), summary(out))


def priv_socket_families(cfg: dict) -> Result:
    def attempt() -> dict:
        out = {}
        for label, fam, typ, proto in (("netlink route", 16, 3, 0), ("vsock", 40, 1, 0),
                                       ("alg", 38, 5, 0), ("packet dgram", 17, 2, 0),
                                       ("key", 15, 3, 2), ("bluetooth", 31, 3, 1),
                                       ("inet|1<<32", (1 << 32) | 2, 1, 0),
                                       ("vsock|1<<32", (1 << 32) | 40, 1, 0)):
            r = sc("socket", fam, typ, proto)
            out[label] = "created" if ok(r) else r
            if ok(r):
                os.close(int(r))
        fds = (ctypes.c_int * 2)()
        r = sc("socketpair", 2, 1, 0, fds)
        out["socketpair(inet)"] = "created" if ok(r) else r
        return out

    out = child(attempt)
    if not isinstance(out, dict):
        return res(False, str(out))
    return res(any(v == "created" for v in out.values()), summary(out))


def priv_userfaultfd(cfg: dict) -> Result:
    out = {"userfaultfd(0)": child(lambda: sc("userfaultfd", 0)),
           "userfaultfd(USER_MODE_ONLY)": child(lambda: sc("userfaultfd", 1))}
    return res(any(ok(v) for v in out.values()), summary(out))


def priv_perf_event(cfg: dict) -> Result:
    def attempt() -> Any:
        attr = (ctypes.c_uint8 * 128)()
        struct.pack_into("<IIQ", attr, 0, 1, 64, 0)  # PERF_TYPE_SOFTWARE, size, CPU_CLOCK
        struct.pack_into("<Q", attr, 40, 1 | 1 << 5 | 1 << 6)  # disabled, exclude kernel+hv
        return sc("perf_event_open", attr, 0, -1, -1, 0)

    r = child(attempt)
    return res(ok(r), f"perf_event_open(self, sw cpu-clock)={r}")


# -- resources -------------------------------------------------------------------------


def emit(aid: str, r: Result) -> None:
    sys.stdout.write(MARK + json.dumps({"id": aid, **r}, default=str) + "\n")
    sys.stdout.flush()


def res_fork_bomb(cfg: dict) -> Result:
    aid = "res.fork-bomb"
    limit = int(cfg["limits"]["pids"])
    cap = limit + 32
    children: list[int] = []
    error = None
    start = time.monotonic()
    try:
        # fork+exec under gVisor on a loaded host can take ~80 ms a child: 256 of them
        # need more than the 20 s this once allowed (the children outlive the loop).
        while len(children) < cap and time.monotonic() - start < 60:
            try:
                pid = os.fork()
            except OSError as exc:
                error = ename(exc.errno)
                break
            if pid == 0:  # pragma: no cover
                # A child that stays a forked Python dirties copy-on-write pages (refcounts)
                # until memory, not pids, ends the bomb (~11 MiB a child under gVisor);
                # exec'ing a small program keeps the attack about the pids limit.
                try:
                    os.execv("/bin/sleep", ["sleep", "120"])
                except OSError:
                    time.sleep(120)
                finally:
                    os._exit(0)
            children.append(pid)
            if len(children) % 32 == 0:
                emit(aid, res(len(children) >= limit, f"{len(children)} processes so far",
                              partial=True, forked=len(children)))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
    n = len(children)
    if error:
        observed = f"fork failed with {error} after {n} processes (pids limit {limit})"
    else:
        observed = f"forked {n} processes without a failure (pids limit {limit})"
        if n < limit:  # out of time below the limit: nothing proven either way
            return res(None, observed + "; out of time before the limit", forked=n)
    return res(n >= limit, observed, forked=n)


def res_memory(cfg: dict) -> Result:
    aid = "res.memory"
    limit = int(cfg["limits"]["memory"])
    target = limit + (128 << 20)
    chunk = 16 << 20
    held = []
    total = 0
    try:
        while total < target:
            b = bytearray(chunk)
            for i in range(0, chunk, 4096):
                b[i] = 1
            held.append(b)
            total += chunk
            if total % (64 << 20) == 0:
                emit(aid, res(total > limit, f"{total >> 20} MiB held", partial=True,
                              held=total))
    except MemoryError:
        return res(False, f"MemoryError after {total >> 20} MiB (limit {limit >> 20} MiB)",
                   held=total)
    return res(total > limit, f"held {total >> 20} MiB (limit {limit >> 20} MiB)", held=total)


def res_tmpfs_fill(cfg: dict) -> Result:
    out = {}
    esc = False
    for path, size in cfg["limits"]["tmpfs"].items():
        target = int(size) + (16 << 20)
        name = f"{path}/airlock-probe-fill"
        written = 0
        err = "no error"
        try:
            with open(name, "wb") as fh:
                block = b"\0" * (1 << 20)
                while written < target:
                    fh.write(block)
                    fh.flush()
                    written += len(block)
        except OSError as exc:
            err = ename(exc.errno)
        finally:
            try:
                os.unlink(name)
            except OSError:
                pass
        out[path] = f"{written >> 20} MiB then {err} (size {int(size) >> 20} MiB)"
        esc = esc or written > int(size)
    return res(esc, summary(out))


def res_workspace_disk(cfg: dict) -> Result:
    aid = "res.workspace-disk"
    ws = "/workspace"
    caps = cfg["disk"]
    out = {}
    try:
        with open(f"{ws}/notes.txt", "a") as fh:
            fh.write(f"edit-{cfg['nonce']}\n")
        out["edit"] = "appended"
    except OSError as exc:
        out["edit"] = ename(exc.errno)
    try:
        with open(f"{ws}/airlock-probe-sparse.img", "wb") as fh:
            fh.truncate(3 << 30)
        out["sparse 3 GiB"] = "created"
    except OSError as exc:
        out["sparse 3 GiB"] = ename(exc.errno)
    big = int(caps["patch_file_size"]) + (1 << 20)
    try:
        with open(f"{ws}/airlock-probe-big.bin", "wb") as fh:
            for _ in range(big >> 20):
                fh.write(os.urandom(1 << 20))
        out[f"real {big >> 20} MiB"] = "written"
    except OSError as exc:
        out[f"real {big >> 20} MiB"] = ename(exc.errno)
    # The host ends the run once the copy is full: say what was done before filling it.
    emit(aid, res(None, summary(out), partial=True, filled=0))
    cap = int(caps["copy_size"])
    filled = 0
    err = "no error"
    try:
        with open(f"{ws}/airlock-probe-fill.bin", "wb") as fh:
            block = b"\0" * (1 << 20)
            while filled < cap + (16 << 20):
                fh.write(block)
                fh.flush()
                filled += len(block)
    except OSError as exc:
        err = ename(exc.errno)
    out["fill"] = f"{filled >> 20} MiB then {err} (copy_size {cap >> 20} MiB)"
    # Everything written beyond the cap would be the escape: the big file, the seed
    # and the fill together cannot fit if the cap holds.
    return res(err != "ENOSPC" and filled >= cap, summary(out), filled=filled)


def res_output_flood(cfg: dict) -> Result:
    budget = int(cfg["limits"]["output_bytes"])
    target = budget * 2 + (1 << 20)
    line = (b"A" * 1023 + b"\n") * 64
    written = 0
    out = sys.stdout.buffer
    while written < target:
        out.write(line)
        written += len(line)
    out.flush()
    return res(None, f"wrote {written} bytes to stdout (budget {budget})", wrote=written)


def res_fd_exhaust(cfg: dict) -> Result:
    import resource

    limit = int(cfg["limits"]["nofile"])
    fds: list[int] = []
    err = "no error"
    try:
        while len(fds) < limit + 64:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        err = ename(exc.errno)
    finally:
        for fd in fds:
            os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard + 1024, hard + 1024))
        raised = "raised"
    except (OSError, ValueError) as exc:
        raised = type(exc).__name__ + (f" {ename(exc.errno)}" if isinstance(exc, OSError) else "")
    n = len(fds)
    esc = n >= limit or raised == "raised"
    return res(esc, f"opened {n} then {err} (nofile {limit}, rlimit {soft}/{hard}); "
                    f"raising the hard limit: {raised}")


# -- secrets and neighbours -------------------------------------------------------------

SCAN_ROOTS = ["/run/airlock", "/home", "/tmp", "/etc", "/workspace", "/opt/airlock", "/var/tmp",
              "/dev/shm", "/root"]


def sec_provider_key(cfg: dict) -> Result:
    found = tokens_in_system(cfg["key_prefix"], SCAN_ROOTS)
    # The host knows the key and judges the tokens; the probe never learns it.
    where = {t[:24] + "...": sorted(set(w))[:3] for t, w in found.items()}
    return res(None, f"key-shaped tokens: {where or 'none'}", tokens=sorted(found))


def sec_key_reflection(cfg: dict) -> Result:
    port = cfg.get("gateway_port")
    if not port:
        return res(False, "no provider gateway in this run")
    body = json.dumps({"model": cfg["model"], "messages": [{"role": "user", "content": "echo"}]})
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           f"Content-Type: application/json\r\nAuthorization: Bearer placeholder\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}").encode()
    data = b""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(req)
        while True:
            more = s.recv(65536)
            if not more:
                break
            data += more
    except OSError as exc:
        data += f"<{ename(exc.errno)}>".encode()
    finally:
        s.close()
    pattern = re.compile(re.escape(cfg["key_prefix"]).encode() + rb"[0-9a-f]{32}")
    tokens = sorted({m.group().decode() for m in pattern.finditer(data)})
    status = data.split(b"\r\n", 1)[0].decode("latin-1")
    echoed = b"x-airlock-echo" in data.lower()
    return res(None, f"{status}; upstream echo {'received' if echoed else 'absent'}; "
                     f"key-shaped tokens in the answer: {len(tokens)}", tokens=tokens)


def sec_host_env(cfg: dict) -> Result:
    found = tokens_in_system(cfg["host_env_prefix"], SCAN_ROOTS)
    return res(None, f"host-canary tokens: {len(found)}", tokens=sorted(found))


def sec_neighbour_files(cfg: dict) -> Result:
    nb = cfg.get("neighbour")
    if not nb:
        return res(None, "no neighbour run")
    out = {}
    d = nb["run_dir"]
    for p in (d, f"{d}/shim.cfg", f"{d}/control.sock"):
        out[p] = "visible" if os.path.lexists(p) else "ENOENT"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(f"{d}/control.sock")
        out["connect control.sock"] = "connected"
    except OSError as exc:
        out["connect control.sock"] = ename(exc.errno)
    finally:
        s.close()
    # Its run id anywhere we can look: our sockets directory, the mounts, any shim.cfg.
    # Our own shim.cfg names it too (this probe's arguments): a file counts only when
    # it names the neighbour and not us.
    own = os.environ.get("AIRLOCK_RUN_ID", "?").encode()
    hits = []
    for path, st in walk_root():
        base = os.path.basename(path)
        if nb["run_id"] in path:
            hits.append(path)
        elif base == "shim.cfg" and stat.S_ISREG(st.st_mode):
            try:
                with open(path, "rb") as fh:
                    data = fh.read(1 << 20)
            except OSError:
                continue
            if nb["run_id"].encode() in data and own not in data:
                hits.append(path)
    if any(d in " ".join(parts) for parts in mountinfo()):
        hits.append("mountinfo")
    out["neighbour run id found in"] = str(hits or "nothing")
    esc = any(v in ("visible", "connected") for v in out.values()) or bool(hits)
    return res(esc, summary(out))


def sec_neighbour_procs(cfg: dict) -> Result:
    nb = cfg.get("neighbour")
    if not nb:
        return res(None, "no neighbour run")
    seen = []
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    # The neighbour's agent ends its argv with the marker and carries its run id in its
    # environment; this probe's own argv merely mentions both.
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read(1 << 20).rstrip(b"\0").split(b"\0")
            if argv and argv[-1] == nb["marker"].encode():
                seen.append(f"{pid} argv")
        except OSError:
            pass
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"AIRLOCK_RUN_ID={nb['run_id']}".encode() in fh.read(1 << 20).split(b"\0"):
                    seen.append(f"{pid} environ")
        except OSError:
            pass
    return res(bool(seen), f"{len(pids)} processes visible; the neighbour's: {seen or 'none'}")


# -- the log ---------------------------------------------------------------------------


def log_forged_events(cfg: dict) -> Result:
    run_id = os.environ.get("AIRLOCK_RUN_ID", "unknown")
    # Not the nonce itself: that is in this probe's arguments, which the host logs.
    nonce = "forged-" + cfg["nonce"][::-1]
    forged = [
        {"seq": 2, "ts": time.time(), "run_id": run_id, "type": "run.end", "source": "host",
         "prev": "0" * 64, "data": {"status": "succeeded", "exit_code": 0, "forged": nonce}},
        {"seq": 3, "ts": time.time(), "run_id": run_id, "type": "proxy.allowed",
         "source": "proxy", "prev": "0" * 64, "data": {"target": "evil:443", "forged": nonce}},
        {"seq": 4, "ts": time.time(), "run_id": run_id, "type": "budget.exceeded",
         "source": "gateway", "prev": "0" * 64, "data": {"forged": nonce}},
    ]
    for i, ev in enumerate(forged):
        line = json.dumps(ev)
        stream = sys.stdout if i % 2 == 0 else sys.stderr
        stream.write(f"\n{line}\n\r{line}\r\n")
        stream.flush()
    return res(None, f"printed {len(forged) * 2} host-shaped events on stdout and stderr")


def log_control_forge(cfg: dict) -> Result:
    path = "/run/airlock/control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        return res(False, f"connect {ename(exc.errno)}")
    msgs = [{"type": "selftest", "ok": True, "checks": [], "runtime": "forged",
             "forged": cfg["nonce"]},
            {"type": "agent.started", "ts": time.time(), "pid": 1, "forged": cfg["nonce"]}]
    try:
        s.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in msgs))
        r, _, _ = select.select([s], [], [], 1.0)
        closed = bool(r) and s.recv(1) == b""
        sent = "sent; the host closed it" if closed else "sent"
    except OSError as exc:
        sent = f"send {ename(exc.errno)}"
    finally:
        s.close()
    return res(None, f"connected, forged messages {sent}")


def log_runs_dir(cfg: dict) -> Result:
    run_id = os.environ.get("AIRLOCK_RUN_ID", "unknown")
    out = {}
    for p in cfg["runs_paths"]:
        out[p] = "visible" if os.path.lexists(p) else "ENOENT"
    hits = []
    for path, _ in walk_root():
        base = os.path.basename(path)
        if base in ("events.jsonl", "report.json") or base == run_id:
            hits.append(path)
    if any(any(p in " ".join(parts) for p in cfg["runs_paths"]) for parts in mountinfo()):
        hits.append("mountinfo names the runs directory")
    out["run directory or log found at"] = str(hits[:5] or "nothing")
    esc = any(v == "visible" for v in out.values()) or bool(hits)
    return res(esc, summary(out))


CHECKS: dict[str, Callable[[dict], Result]] = {
    "net.interfaces": net_interfaces,
    "net.host-tcp": net_host_tcp,
    "net.host-ipv6": net_host_ipv6,
    "net.loopback-canary": net_loopback_canary,
    "net.udp": net_udp,
    "net.dns-resolve": net_dns_resolve,
    "net.dns-exfil": net_dns_exfil,
    "net.bridge-gateway": net_bridge_gateway,
    "net.metadata-route": net_metadata_route,
    "net.raw-socket": net_raw_socket,
    "proxy.disallowed-port": proxy_disallowed_port,
    "proxy.ip-literal": proxy_ip_literal,
    "proxy.private-name": proxy_private_name,
    "proxy.host-mismatch": proxy_host_mismatch,
    "proxy.dns-exfil": proxy_dns_exfil,
    "fs.root-write": fs_root_write,
    "fs.proc-sys": fs_proc_sys,
    "fs.sys": fs_sys,
    "fs.proc-masked": fs_proc_masked,
    "fs.mknod": fs_mknod,
    "fs.exec-tmpfs": fs_exec_tmpfs,
    "fs.shim-write": fs_shim_write,
    "fs.sockets-dir": fs_sockets_dir,
    "fs.workspace-symlink": fs_workspace_symlink,
    "fs.workspace-hardlink": fs_workspace_hardlink,
    "fs.host-sockets": fs_host_sockets,
    "priv.capabilities": priv_capabilities,
    "priv.setuid": priv_setuid,
    "priv.no-new-privs": priv_no_new_privs,
    "priv.seccomp-off": priv_seccomp_off,
    "priv.unshare": priv_unshare,
    "priv.mount": priv_mount,
    "priv.ptrace": priv_ptrace,
    "priv.keyctl": priv_keyctl,
    "priv.bpf": priv_bpf,
    "priv.io-uring": priv_io_uring,
    "priv.personality": priv_personality,
    "priv.socket-families": priv_socket_families,
    "priv.userfaultfd": priv_userfaultfd,
    "priv.perf-event": priv_perf_event,
    "res.fork-bomb": res_fork_bomb,
    "res.memory": res_memory,
    "res.tmpfs-fill": res_tmpfs_fill,
    "res.output-flood": res_output_flood,
    "res.fd-exhaust": res_fd_exhaust,
    "res.workspace-disk": res_workspace_disk,
    "sec.provider-key": sec_provider_key,
    "sec.key-reflection": sec_key_reflection,
    "sec.host-env": sec_host_env,
    "sec.neighbour-files": sec_neighbour_files,
    "sec.neighbour-procs": sec_neighbour_procs,
    "log.forged-events": log_forged_events,
    "log.control-forge": log_control_forge,
    "log.runs-dir": log_runs_dir,
}


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[1])
    for aid in cfg["checks"]:
        fn = CHECKS.get(aid)
        if fn is None:
            emit(aid, res(None, "the probe has no such check", error=True))
            continue
        t0 = time.monotonic()
        try:
            r = fn(cfg)
        except Exception as exc:
            r = res(None, f"probe error: {type(exc).__name__}: {exc}", error=True)
        r["seconds"] = round(time.monotonic() - t0, 3)
        emit(aid, r)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
