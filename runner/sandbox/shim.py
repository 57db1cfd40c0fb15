"""The in-sandbox shim: bridges, dead-man switch, self-test, then the agent.

Runs inside the container as the sandbox user, under the engine's init, with only the
standard library (the image has no other Python packages for it). Configuration is the
JSON file the host writes into the read-only run directory, `/run/airlock/shim.json`:

    {"run_id": "...", "argv": ["cmd", ...], "env": {...}, "cwd": "/workspace",
     "bridges": [{"name": "provider", "port": 41001, "socket": "/run/airlock/provider.sock"}],
     "control": "/run/airlock/control.sock" | null,
     "files": {"/home/airlock/.config/x.toml": "..."},
     "selftest": {...} | null}

Order: listen on every bridge port (so the agent never races them), connect the
control socket, run the self-test and report it, start the agent in its own process
group with exactly `env`, report its exit, and exit with its code. If the control
connection drops (the host process died), the agent's process group is killed and the
shim exits: the sandbox does not outlive its host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

CONFIG_PATH = "/run/airlock/shim.json"
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


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(_BUF)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve_bridge(listener: socket.socket, path: str) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            client.close()
            upstream.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def start_bridges(bridges: list[dict]) -> list[socket.socket]:
    listeners = []
    for bridge in bridges:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(bridge["port"])))
        s.listen(128)
        threading.Thread(target=_serve_bridge, args=(s, bridge["socket"]), daemon=True).start()
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


class Control:
    """The line-delimited JSON channel to the host; its loss is the dead-man signal."""

    def __init__(self, path: str | None) -> None:
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        if path:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            self.sock = s

    def send(self, **msg: object) -> None:
        line = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        if self.sock is None:
            return
        with self._lock, contextlib.suppress(OSError):
            self.sock.sendall(line)

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

        threading.Thread(target=run, daemon=True).start()


def main(argv: list[str]) -> int:
    _protect_self()
    with open(argv[1] if len(argv) > 1 else CONFIG_PATH, encoding="utf-8") as fh:
        cfg = json.load(fh)
    start_bridges(cfg.get("bridges") or [])
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
    try:
        child = subprocess.Popen(cfg["argv"], env=env, cwd=cfg.get("cwd") or "/",
                                 start_new_session=True, close_fds=True)
    except OSError as exc:
        sys.stderr.write(f"airlock: cannot start {cfg['argv'][0]!r}: {exc.strerror}\n")
        control.send(type="agent.exit", code=127, error=str(exc))
        return 127
    control.send(type="agent.started", ts=time.time(), pid=child.pid)

    def kill_group(sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)

    def on_lost() -> None:
        kill_group()
        sys.stderr.write("airlock: host connection lost; sandbox ended\n")
        os._exit(DEADMAN_EXIT)

    control.watch(on_lost)

    def forward(signum: int, _frame: object) -> None:
        kill_group(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    code = wait_agent(child.pid)
    # Anything the agent left running in its group goes with it.
    kill_group()
    code = 128 - code if code < 0 else code
    control.send(type="agent.exit", code=code, ts=time.time())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
