"""The thin `airlock run`: hand the run to `airlock serve` if one answers.

Standard library only, so that it costs an interpreter start and a few milliseconds,
not the imports of the docker SDK, pydantic and typer. Returns None whenever the
server cannot take the run (none listening, a socket that is not safely ours, an
option the server leaves to the client's own process); the caller then runs it
in-process exactly as without a server.

What crosses the socket: the arguments, the working directory, the client's stdin,
stdout and stderr (as descriptors, so output goes straight to them), a fixed set of
non-secret variables (engine address, runs directory, terminal), and then only the
variables the server names for this run: the policy's `env.allow` and the provider's
key variable. The server uses these values, never its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from runner.server import paths
from runner.server import protocol as p

TYPE_CHECKING = False  # typing itself is not imported: this module is on every run's path
if TYPE_CHECKING:
    from typing import Any

# Non-secret variables that decide where and how a run happens; sent with the hello.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
            "COLORTERM", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")
BASE_PREFIXES = ("AIRLOCK_", "DOCKER_", "LC_")
LOST = 3  # the server went away mid-run: like a lost engine, the environment failed
# What a server this client starts may see: where to find things, not what to unlock.
SERVER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
              "DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY",
              "DOCKER_CONFIG", "AIRLOCK_RUNS_DIR", "AIRLOCK_PRESETS")


def base_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    return {k: v for k, v in environ.items()
            if k in BASE_ENV or k.startswith(BASE_PREFIXES)}


def prog_name() -> str:
    """What usage messages call this program (click's own rule, without importing it)."""
    path = sys.argv[0]
    package = getattr(sys.modules.get("__main__"), "__package__", None)
    if not package:
        return os.path.basename(path)
    name = os.path.splitext(os.path.basename(path))[0]
    module = package if name == "__main__" else f"{package}.{name}"
    return f"python -m {module.lstrip('.')}"


def connect(path: str) -> socket.socket | None:
    """A connection to a server of our own uid at `path`, or None."""
    try:
        paths.check_socket(path)
    except paths.InsecurePath:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        if paths.peer_uid(sock) != os.geteuid():
            raise OSError("the server runs as another user")
    except OSError:
        sock.close()
        return None
    return sock


def _nobody_listens(path: str) -> bool:
    """No socket there, or one left by a server that is gone (not: someone else's)."""
    try:
        paths.check_dir(os.path.dirname(path))
    except paths.InsecurePath:
        return not os.path.lexists(os.path.dirname(path))
    if not os.path.lexists(path):
        return True
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def start_server(path: str) -> None:
    """Start `airlock serve --auto` for this user, detached, and do not wait for it.

    It gets only variables that say where things are (SERVER_ENV: no keys, and the
    server never uses its own environment for a run), no descriptors of ours (a caller
    capturing our output must not wait for the server), its own session, and `/` as
    its directory. It logs beside its socket and ends after 30 idle minutes.
    """
    import subprocess

    env = {k: v for k, v in os.environ.items() if k in SERVER_ENV or k.startswith("LC_")}
    env[paths.SOCKET_ENV] = path
    with contextlib.suppress(OSError):  # no server this time: runs go in-process
        # -P: `/` (its working directory) is not put in front of the import path.
        subprocess.Popen([sys.executable, "-P", "-m", "runner.cli", "serve", "--auto"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd="/", env=env,
                         start_new_session=True, close_fds=True)


def run_via_server(args: list[str]) -> int | None:
    """`airlock run ARGS` through a server: its exit code, or None to run in-process.

    With no server listening, one is started for the runs that follow (unless
    AIRLOCK_AUTO_SERVE=0) and this run goes in-process."""
    if os.environ.get(paths.NO_SERVE_ENV):
        return None
    path = paths.default_socket()
    sock = connect(path)
    if sock is None:
        if os.environ.get(paths.AUTO_SERVE_ENV, "1") != "0" and _nobody_listens(path):
            start_server(path)
        return None
    with sock:
        try:
            p.send(sock, p.HELLO, {"v": p.VERSION, "argv": args, "cwd": os.getcwd(),
                                   "env": base_env(), "prog": prog_name(),
                                   "runner": p.INSTALLATION}, fds=[0, 1, 2])
        except OSError:
            return None
        return _converse(sock)


def _converse(sock: socket.socket) -> int | None:
    reader = p.Reader(sock)
    started = False
    interrupted = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted > 2:  # a third Ctrl-C: stop waiting (the run was told twice)
            raise KeyboardInterrupt
        with contextlib.suppress(OSError):
            p.send(sock, p.INTERRUPT)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                frame = reader.frame()
                if frame is not None and frame[0] == p.NEED:
                    names = p.loads(frame[1]) or []
                    p.send(sock, p.ENV, {n: os.environ[n] for n in names if n in os.environ})
                    continue
            except (OSError, ValueError, p.ProtocolError):
                frame = None
            if frame is None:
                if not started:
                    return 130 if interrupted else None
                sys.stderr.write("airlock: the server running this run went away\n")
                return LOST
            kind, body = frame
            if kind == p.START:
                started = True
            elif kind == p.EXIT:
                return int((p.loads(body) or {}).get("code", 1))
            elif kind == p.FALLBACK:  # nothing ran: a Ctrl-C meanwhile means none should
                return 130 if interrupted else None
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
