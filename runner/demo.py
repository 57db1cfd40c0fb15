"""`make demo`: a run under the strict preset that tries forbidden things, each failing.

The script below runs inside the sandbox as an ordinary `command` agent. Every attempt
is something an escaping agent would try; the sandbox prints what the kernel (or gVisor)
answered, and the host's own log of the run is shown at the end.
"""

from __future__ import annotations

import subprocess
import sys

from runner.run.hostaddrs import host_addresses

ATTEMPTS = r'''
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def name(e): return errno.errorcode.get(e, str(e))
def attempt(what, fn):
    try:
        fn(); print(f"  ESCAPED  {what}"); return False
    except OSError as exc:
        print(f"  blocked  {what:48} {name(exc.errno or 0)}"); return True
def sys_(nr, *args):
    def go():
        ctypes.set_errno(0)
        if libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args]) < 0:
            e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    return go
def write(path):
    return lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
def connect(addr, port=22):
    def go():
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        s.settimeout(2)
        try: s.connect((addr, port))
        finally: s.close()
    return go
print(f"inside the sandbox as uid {os.getuid()}, interfaces: "
      + ",".join(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
ok = True
ok &= attempt("write /etc/passwd", write("/etc/passwd"))
ok &= attempt("write a file in /usr/bin", write("/usr/bin/evil"))
ok &= attempt("write the read-only workspace", write("/workspace/evil"))
for a in sys.argv[1:]:
    ok &= attempt(f"connect to the host at {a}", connect(a))
ok &= attempt("unshare a user namespace", sys_(272, 0x10000000))
ok &= attempt("mount a filesystem", sys_(165, 0, 0, 0, 0, 0))
ok &= attempt("ptrace(PTRACE_TRACEME)", sys_(101, 0, 0, 0, 0))
ok &= attempt("bpf()", sys_(321, 0, 0, 0))
ok &= attempt("io_uring_setup()", sys_(425, 1, 0))
ok &= attempt("open a netlink socket", lambda: socket.socket(16, socket.SOCK_RAW, 0))
keys = [k for k in os.environ if "KEY" in k or "TOKEN" in k or "SECRET" in k]
print(f"  {'blocked' if not keys else 'ESCAPED'}  host secrets in the environment{'':22} {keys or 'none'}")
sys.exit(0 if ok and not keys else 1)
'''


def main() -> int:
    print("Airlock demo: an agent under the `strict` preset (gVisor) tries to break out.\n",
          flush=True)
    cmd = [sys.executable, "-m", "runner.cli", "run", "--policy", "strict", "--",
           "python3", "-c", ATTEMPTS, *host_addresses()]
    code = subprocess.call(cmd)
    print("\nThe host's record of the run (airlock events latest):", flush=True)
    subprocess.call([sys.executable, "-m", "runner.cli", "events", "latest", "--type", "run.",
                     "--type", "selftest", "--type", "sandbox."])
    print(f"\nairlock run exited {code}: "
          f"{'every attempt was blocked' if code == 0 else 'something got through or failed'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
