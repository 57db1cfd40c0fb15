"""The readiness self-test, run by the shim inside the sandbox before the agent starts.

Standard library only. "Unreachable" is proven from the sandbox's own interfaces and
routes (no packet is sent towards any address off this machine), plus a connect() to
the host's own addresses, which the host passes in and which are on this machine.
"""

from __future__ import annotations

import _socket
import errno
import os

# `typing` only for the type checker: importing it costs the shim's start several ms
# under runc and tens of ms under gVisor (annotations are strings at run time).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES, errno.EPERM,
                errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail}


def _status_field(name: str) -> str | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def interfaces() -> list[str]:
    with open("/proc/net/dev", encoding="ascii") as fh:
        return [line.split(":", 1)[0].strip() for line in fh.readlines()[2:] if ":" in line]


def routes_off_loopback() -> list[str]:
    """Every IPv4/IPv6 route through an interface other than lo."""
    out = []
    try:
        with open("/proc/net/route", encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts and parts[0] != "lo":
                    out.append(f"v4 {parts[0]} dst={parts[1]}")
    except OSError:
        pass
    try:
        with open("/proc/net/ipv6_route", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                if parts and parts[-1] != "lo":
                    out.append(f"v6 {parts[-1]} dst={parts[0]}")
    except OSError:
        pass
    return out


def detect_runtime() -> str:
    # gVisor's Sentry reports a fixed, old kernel and has no real /proc/1/mountinfo sources;
    # its dmesg-like boot banner is the most stable tell.
    try:
        with open("/proc/version", encoding="ascii") as fh:
            version = fh.read()
    except OSError:
        version = ""
    if "gVisor" in version or version.startswith("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016"):
        return "runsc"
    return "runc"


def _connect_fails(addr: str, port: int) -> tuple[bool, str]:
    family = _socket.AF_INET6 if ":" in addr else _socket.AF_INET
    s = None
    try:
        # Made inside the try: a sandbox with no such family (EAFNOSUPPORT) cannot reach it.
        s = _socket.socket(family, _socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect((addr, port))
    except OSError as exc:
        code = exc.errno or 0
        if isinstance(exc, TimeoutError) or code in _UNREACHABLE:
            return True, errno.errorcode.get(code, "timeout")
        return False, f"{errno.errorcode.get(code, code)} (the address answered)"
    else:
        return False, "connected"
    finally:
        if s is not None:
            s.close()


def _http_answers(port: int) -> tuple[bool, str]:
    # _socket, not socket: see runner/sandbox/shim.py on what the shim imports.
    s = None
    try:
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /airlock/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = s.recv(64)
    except OSError as exc:
        return False, str(exc)
    finally:
        if s is not None:
            s.close()
    status = head.split(b"\r\n", 1)[0]
    return status.split(b" ")[1:2] == [b"200"], status.decode("latin-1")


def run_selftest(cfg: dict[str, Any], bridges: list[dict[str, Any]]) -> dict[str, Any]:
    checks = []
    uid = os.getuid()
    checks.append(_check("non-root", uid != 0, f"uid={uid}"))
    cap = _status_field("CapEff") or "?"
    checks.append(_check("no-capabilities", cap.strip("0") == "", f"CapEff={cap}"))
    ifaces = interfaces()
    checks.append(_check("loopback-only", ifaces == ["lo"], f"interfaces={','.join(ifaces)}"))
    routes = routes_off_loopback()
    checks.append(_check("no-routes", not routes, "; ".join(routes) or "no route off lo"))
    # Proven by the routing table alone: with no route off lo the kernel cannot send a
    # packet to these, so none is sent to find out.
    v4 = [r for r in routes if r.startswith("v4")]
    v6 = [r for r in routes if r.startswith("v6")]
    checks.append(_check("external-unreachable", not v4, "no IPv4 route" if not v4 else v4[0]))
    checks.append(_check("metadata-unreachable", not v4,
                         "169.254.169.254 has no route" if not v4 else v4[0]))
    checks.append(_check("ipv6-unreachable", not v6, "no IPv6 route" if not v6 else v6[0]))
    try:
        with open("/etc/resolv.conf", encoding="utf-8") as fh:
            servers = [line.split()[1] for line in fh if line.startswith("nameserver ")]
    except OSError:
        servers = []
    checks.append(_check("no-dns", not servers, f"nameservers={servers}"))
    if cfg.get("read_only_root", True):
        try:
            fd = os.open("/.airlock-selftest", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            os.unlink("/.airlock-selftest")
            checks.append(_check("read-only-root", False, "created a file in /"))
        except OSError as exc:
            checks.append(_check("read-only-root", True, errno.errorcode.get(exc.errno or 0, "?")))
    for addr in cfg.get("host_addresses") or []:
        ok, detail = _connect_fails(addr, int(cfg.get("canary_port") or 9))
        checks.append(_check(f"host-unreachable:{addr}", ok, detail))
    for bridge in bridges:
        if bridge["name"] == "provider":
            ok, detail = _http_answers(int(bridge["port"]))
            checks.append(_check("provider-reachable", ok, detail))
    runtime = detect_runtime()
    expected = cfg.get("runtime")
    if expected:
        checks.append(_check("runtime", runtime == expected, f"detected {runtime}"))
    seccomp = _status_field("Seccomp")
    # Under gVisor this is 2 only when runsc runs with --oci-seccomp; an engine that
    # registered runsc without it would run the sandbox with no filter at all.
    checks.append(_check("seccomp", seccomp == "2", f"Seccomp={seccomp}"))
    if runtime == "runc":
        # gVisor has no NoNewPrivs line in /proc/self/status.
        nnp = _status_field("NoNewPrivs")
        checks.append(_check("no-new-privileges", nnp == "1", f"NoNewPrivs={nnp}"))
    return {"ok": all(c["ok"] for c in checks), "checks": checks, "runtime": runtime}
