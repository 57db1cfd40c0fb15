"""Run INSIDE the sandbox (mounted read-only at /workspace): attempts what must fail and
prints one JSON object with what happened, errno names included, so the host-side test
can check that each attempt failed for the right reason."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def ename(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def try_write(path: str) -> str:
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as exc:
        return ename(exc.errno or 0)
    os.close(fd)
    os.unlink(path)
    return "written"


def root_mount_options() -> str:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            if parts[4] == "/":
                return parts[5]
    return "?"


def fs() -> dict:
    out = {p: try_write(p) for p in ("/probe", "/etc/probe", "/usr/probe", "/workspace/probe",
                                     "/tmp/probe", "/home/airlock/probe")}
    out["root_mount_options"] = root_mount_options()
    return out


def net(addrs: list[str], port: int) -> dict:
    with open("/proc/net/dev") as fh:
        ifaces = [ln.split(":")[0].strip() for ln in fh.readlines()[2:]]
    with open("/proc/net/route") as fh:
        routes4 = [ln.split()[0:2] for ln in fh.readlines()[1:]]
    try:
        with open("/proc/net/ipv6_route") as fh:
            routes6 = [ln.split()[-1] for ln in fh]
    except OSError:
        routes6 = []
    connects = {}
    for addr in addrs:
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect((addr, port))
            connects[addr] = "connected"
        except TimeoutError:
            connects[addr] = "timeout"
        except OSError as exc:
            connects[addr] = ename(exc.errno or 0)
        finally:
            s.close()
    try:
        socket.getaddrinfo("localhost.airlock-test.invalid", 80)
        dns = "resolved"
    except socket.gaierror as exc:
        dns = f"gaierror {exc.errno}"
    return {"interfaces": ifaces, "routes4": routes4, "routes6_off_lo": [r for r in routes6 if r != "lo"],
            "connects": connects, "dns": dns}


def ids() -> dict:
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "CapEff": status["CapEff"].strip(), "CapPrm": status["CapPrm"].strip(),
            "CapBnd": status["CapBnd"].strip(), "Seccomp": status.get("Seccomp", "").strip()}


# x86_64 syscall numbers
SYSCALLS = {
    "unshare": (272, [0x10000000]),  # CLONE_NEWUSER
    "mount": (165, [0, 0, 0, 0, 0]),
    "umount2": (166, [0, 0]),
    "pivot_root": (155, [0, 0]),
    "setns": (308, [0, 0]),
    "ptrace": (101, [0, 0, 0, 0]),  # PTRACE_TRACEME
    "process_vm_readv": (310, [1, 0, 0, 0, 0, 0]),
    "bpf": (321, [0, 0, 0]),
    "keyctl": (250, [0, 0, 0, 0, 0]),
    "add_key": (248, [0, 0, 0, 0, 0]),
    "request_key": (249, [0, 0, 0, 0]),
    "userfaultfd": (323, [0]),
    "perf_event_open": (298, [0, 0, 0, -1, 0]),
    "io_uring_setup": (425, [1, 0]),
    "personality": (135, [0x0040000]),  # ADDR_NO_RANDOMIZE
    "kexec_load": (246, [0, 0, 0, 0]),
    "init_module": (175, [0, 0, 0]),
    "socket_netlink": (41, [16, 3, 0]),
    "socket_packet": (41, [17, 3, 0]),
    "socket_vsock": (41, [40, 1, 0]),
    "socket_inet_hi_bits": (41, [(1 << 32) | 2, 1, 0]),
}


def syscalls() -> dict:
    out = {}
    for name, (nr, args) in SYSCALLS.items():
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        out[name] = "ok" if ret >= 0 else ename(ctypes.get_errno())
    # Things that must keep working.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.close()
    u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    u.close()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    out["fork_works"] = "ok"
    return out


def forkbomb(limit_s: float = 15) -> dict:
    children, error = [], None
    start = time.time()
    while time.time() - start < limit_s:
        try:
            pid = os.fork()
        except OSError as exc:
            error = ename(exc.errno or 0)
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    count = len(children)
    for pid in children:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return {"forked": count, "error": error}


def memory(mb: int) -> dict:
    chunks = []
    for _ in range(mb):
        chunks.append(bytearray(1 << 20))
    return {"allocated_mb": len(chunks)}


def main() -> None:
    what = sys.argv[1]
    if what == "fs":
        out = fs()
    elif what == "net":
        out = net(sys.argv[3:], int(sys.argv[2]))
    elif what == "ids":
        out = ids()
    elif what == "syscalls":
        out = syscalls()
    elif what == "env":
        out = {"env": dict(os.environ)}
    elif what == "forkbomb":
        out = forkbomb()
    elif what == "memory":
        out = memory(int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown probe {what}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
