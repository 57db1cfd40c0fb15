"""The in-sandbox shim: bridges, dead-man switch, self-test, then the agent.

Runs inside the container as the sandbox user and as its PID 1, with only the standard
library (the image has no other Python packages for it), and with as little of it as
will do: under gVisor every module imported costs milliseconds (each syscall and each
first touch of a page traps), and all of it lies between `docker start` and the
agent's first instruction. So no json (and with it re), subprocess or contextlib: the
configuration is a marshal file, the messages to the host are JSON written by
`to_json` below, and the agent is started with posix_spawn. Nor socket, signal or
threading: their C cores (_socket, _signal, _thread) do all the shim needs, and the
Python layers on top import enum, selectors and collections (measured under gVisor:
~20 ms of the shim's ~28 ms of imports).

Configuration: the file the host writes into the read-only run directory,
`/run/airlock/shim.cfg` (marshal, format 4, of plain dicts, lists and strings):

    {"run_id": "...", "argv": ["cmd", ...], "env": {...}, "cwd": "/workspace",
     "bridges": [{"name": "provider", "port": 41001, "socket": "/run/airlock/provider.sock"}],
     "control": "/run/airlock/control.sock" | null,
     "files": {"/home/airlock/.config/x.toml": "..."},
     "selftest": {...} | null}

A pooled sandbox is started with `--pool` before any run exists and gets the same
configuration over `/run/airlock/pool.sock` when a run claims it (`wait_for_claim`).

Order: listen on every bridge port (so the agent never races them), connect the
control socket, run the self-test and report it, start the agent in its own process
group with exactly `env`, report its exit, and exit with its code. If the control
connection drops (the host process died), the agent's process group is killed and the
shim exits: the sandbox does not outlive its host.
"""

from __future__ import annotations

import _signal
import _socket
import _thread
import marshal
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

CONFIG_PATH = "/run/airlock/shim.cfg"
POOL_SOCKET = "/run/airlock/pool.sock"
POOL_FLAG = "--pool"
MAX_CONFIG = 16 << 20  # bytes: a claim's configuration is a few kilobytes
DEADMAN_EXIT = 125
_BUF = 65536


def _protect_self() -> None:
    # The agent runs as the same uid; without this it could read the shim's memory and
    # descriptors through /proc/<pid>/. Non-dumpable processes are off limits to it.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def _pipe(src: _socket.socket, dst: _socket.socket) -> None:
    try:
        while True:
            data = src.recv(_BUF)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(_socket.SHUT_WR)
        except OSError:
            pass


def _serve_bridge(listener: _socket.socket, path: str) -> None:
    while True:
        try:
            fd, _ = listener._accept()  # type: ignore[attr-defined]  # accept4, CLOEXEC
        except OSError:
            return
        # The family and type given, as socket.accept does: no lookups (each a trap
        # under gVisor), and nothing that could fail and leave the descriptor behind.
        client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
        upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            client.close()
            upstream.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            _thread.start_new_thread(_pipe, (a, b))


def start_bridges(bridges: list[dict]) -> list[_socket.socket]:
    listeners = []
    for bridge in bridges:
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(bridge["port"])))
        s.listen(128)
        _thread.start_new_thread(_serve_bridge, (s, bridge["socket"]))
        listeners.append(s)
    return listeners


def wait_agent(pid: int) -> int:
    """The agent's exit code (negative: the signal that ended it).

    The shim is the sandbox's PID 1 (not the engine's init, which would run as the
    sandbox user and be dumpable, so the agent could open its /proc/1/mem): orphans are
    reparented to it, so it reaps every child and returns when the agent's own ends.
    """
    while True:
        try:
            reaped, status = os.waitpid(-1 if os.getpid() == 1 else pid, 0)
        except ChildProcessError:
            return 1
        if reaped == pid:
            return os.waitstatus_to_exitcode(status)


def write_files(files: dict[str, str]) -> None:
    for path, content in files.items():
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(content)


# JSON as json.dumps writes it with ensure_ascii: quotes, backslashes and control
# characters escaped, everything outside ASCII as \\u escapes (surrogate pairs above
# the BMP), so a line is always ASCII and never split by a newline in a value.
_ESCAPES = {i: f"\\u{i:04x}" for i in (*range(0x20), 0x7F)}
_ESCAPES.update({0x22: '\\"', 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t",
                 0x08: "\\b", 0x0C: "\\f"})


def _json_str(s: str) -> str:
    s = s.translate(_ESCAPES)
    if not s.isascii():
        out = []
        for ch in s:
            o = ord(ch)
            if o < 0x80:
                out.append(ch)
            elif o < 0x10000:
                out.append(f"\\u{o:04x}")
            else:
                o -= 0x10000
                out.append(f"\\u{0xD800 | (o >> 10):04x}\\u{0xDC00 | (o & 0x3FF):04x}")
        s = "".join(out)
    return '"' + s + '"'


def to_json(obj: object) -> str:
    """Dicts, lists, tuples, strings, numbers, booleans and None as compact JSON."""
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, float):
        return repr(obj) if obj == obj and obj not in (float("inf"), float("-inf")) else "null"
    if isinstance(obj, str):
        return _json_str(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(_json_str(str(k)) + ":" + to_json(v) for k, v in obj.items()) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(to_json(v) for v in obj) + "]"
    return _json_str(str(obj))


def find_executable(name: str, env: dict[str, str]) -> str:
    """`name` resolved against the agent's own PATH, as execvpe would."""
    if "/" in name:
        return name
    for d in (env.get("PATH") or os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise FileNotFoundError(2, "No such file or directory", name)


def spawn_agent(argv: list[str], env: dict[str, str], cwd: str, close: list[int]) -> int:
    """Start the agent in its own session with exactly `env`, in `cwd`, without any of
    the shim's descriptors but 0-2, and with default SIGPIPE and SIGXFSZ (Python
    ignores SIGPIPE, and an ignored signal would stay ignored across exec)."""
    os.chdir(cwd)  # posix_spawn has no chdir; the shim needs no directory of its own
    return os.posix_spawn(
        find_executable(argv[0], env), argv, env, setsid=True,
        setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),
        file_actions=[(os.POSIX_SPAWN_CLOSE, fd) for fd in close])


class Control:
    """The line-delimited JSON channel to the host; its loss is the dead-man signal."""

    def __init__(self, path: str | None) -> None:
        self.sock: _socket.socket | None = None
        self._lock = _thread.allocate_lock()
        if path:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            s.connect(path)
            self.sock = s

    def send(self, **msg: object) -> None:
        if self.sock is None:
            return
        line = (to_json(msg) + "\n").encode("ascii")
        with self._lock:
            try:
                self.sock.sendall(line)
            except OSError:
                pass

    def watch(self, on_lost: Callable[[], None]) -> None:
        sock = self.sock
        if sock is None:
            return

        def run() -> None:
            try:
                while sock.recv(1024):
                    pass
            except OSError:
                pass
            on_lost()

        _thread.start_new_thread(run, ())


def _recv_exact(sock: _socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        data = sock.recv(min(n, _BUF))
        if not data:
            raise EOFError
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def wait_for_claim(path: str = POOL_SOCKET) -> dict:
    """A pooled sandbox: say "warm" to the pool, then block until a run claims it.

    Until then the sandbox holds nothing of any run: no configuration, no sockets but
    this one, no environment beyond the image's. The claim is the run's configuration,
    a 4-byte big-endian length and the marshal bytes; the pool's connection closing
    first means the pool is gone, and so is the sandbox. The self-test module is
    imported now, while nobody waits, and run after the claim, for that run.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.connect(path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import selftest  # noqa: F401  (imported ahead: the claim runs it)

    sock.sendall(b'{"type":"warm"}\n')
    try:
        size = int.from_bytes(_recv_exact(sock, 4), "big")
        if size > MAX_CONFIG:
            raise EOFError
        cfg = marshal.loads(_recv_exact(sock, size))
    except (EOFError, OSError, ValueError):
        os._exit(DEADMAN_EXIT)
    sock.close()
    return cfg


def main(argv: list[str]) -> int:
    _protect_self()
    if len(argv) > 1 and argv[1] == POOL_FLAG:
        cfg = wait_for_claim()
    else:
        with open(argv[1] if len(argv) > 1 else CONFIG_PATH, "rb") as fh:
            cfg = marshal.load(fh)
    listeners = start_bridges(cfg.get("bridges") or [])
    control = Control(cfg.get("control"))
    control.send(type="shim.ready", ts=time.time(), pid=os.getpid())

    if cfg.get("selftest") is not None:
        # `python3 -I` leaves the script's own directory off sys.path.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from selftest import run_selftest

        report = run_selftest(cfg["selftest"], cfg.get("bridges") or [])
        control.send(type="selftest", **report)
        if not report["ok"] and cfg["selftest"].get("gate", True):
            sys.stderr.write("airlock: readiness self-test failed; the agent was not started\n")
            for check in report["checks"]:
                if not check["ok"]:
                    sys.stderr.write(f"  {check['name']}: {check['detail']}\n")
            return 3

    try:
        write_files(cfg.get("files") or {})
    except OSError as exc:
        sys.stderr.write(f"airlock: cannot write the agent's configuration: {exc}\n")
        control.send(type="agent.exit", code=126, error=str(exc))
        return 126

    env = {str(k): str(v) for k, v in (cfg.get("env") or {}).items()}
    own_fds = [s.fileno() for s in listeners]
    if control.sock is not None:
        own_fds.append(control.sock.fileno())
    try:
        pid = spawn_agent([str(a) for a in cfg["argv"]], env, cfg.get("cwd") or "/", own_fds)
    except OSError as exc:
        sys.stderr.write(f"airlock: cannot start {cfg['argv'][0]!r}: {exc.strerror}\n")
        control.send(type="agent.exit", code=127, error=str(exc))
        return 127
    control.send(type="agent.started", ts=time.time(), pid=pid)

    def kill_group(sig: int = _signal.SIGKILL) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def on_lost() -> None:
        kill_group()
        sys.stderr.write("airlock: host connection lost; sandbox ended\n")
        os._exit(DEADMAN_EXIT)

    control.watch(on_lost)

    def forward(signum: int, _frame: object) -> None:
        kill_group(signum)

    for sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(sig, forward)

    code = wait_agent(pid)
    # Anything the agent left running in its group goes with it.
    kill_group()
    code = 128 - code if code < 0 else code
    control.send(type="agent.exit", code=code, ts=time.time())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
