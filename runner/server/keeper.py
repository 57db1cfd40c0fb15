"""The per-user server's warm pool, in a process of its own.

The server forks its workers and must stay free of threads and of the engine's
connection to do so safely; a pool needs both. So the server forks one keeper, which
holds a `Pool` and listens on `pool.sock` beside the server's socket (0600, in the
same 0700 directory, peers of other uids refused by SO_PEERCRED). A worker whose run
is to start asks it for a sandbox of its run's boundary; the keeper answers with
the sandbox's container and directories and passes the pool connection's descriptor
(SCM_RIGHTS), and forgets it: from then on the sandbox is the worker's run's, which
writes its own owner into the sandbox's scratch directory, so `airlock gc` judges the
claimed sandbox by the run's process, not the keeper's.

Sizes are learned from the claims (misses included) and capped: `AIRLOCK_POOL_MAX`
sandboxes at most in all (default 4), two per boundary; `AIRLOCK_POOL=0` turns
pools off. When the keeper ends, its unclaimed sandboxes end with it (their shims
hold the pool connection as a dead-man switch) and it removes them first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from runner.server import paths

KEEPER_SOCKET = "pool.sock"
POOL_ENV = "AIRLOCK_POOL"  # "0": no pools
POOL_MAX_ENV = "AIRLOCK_POOL_MAX"
MAX_REQUEST = 1 << 20  # bytes: a policy as JSON
CLAIM_TIMEOUT = 5.0


def pools_enabled() -> bool:
    return os.environ.get(POOL_ENV, "1") != "0"


def keeper_path(server_socket: Path) -> Path:
    return server_socket.with_name(KEEPER_SOCKET)


def _log(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.write(2, f"airlock serve[{os.getpid()}] pool: {msg}\n".encode())


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return buf


# -- the keeper process ---------------------------------------------------------------


class Keeper:
    def __init__(self, path: Path, server_pid: int) -> None:
        from runner.engines.docker_engine import DockerEngine
        from runner.run.pool import Pool

        self.path = path
        self.server_pid = server_pid
        self.stopping = threading.Event()
        total = int(os.environ.get(POOL_MAX_ENV) or 4)
        self.pool = Pool(DockerEngine(), max_total=max(0, total), max_per_key=2,
                         on_error=_log)

    def serve(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # 0600 from its first instant
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        sock.settimeout(1.0)
        _log(f"listening on {self.path}")
        try:
            while not self.stopping.is_set():
                if os.getppid() != self.server_pid:
                    break  # the server is gone: so is its pool
                try:
                    conn, _ = sock.accept()
                except (TimeoutError, InterruptedError):
                    continue
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.pool.close()
        return 0

    def _handle(self, conn: socket.socket) -> None:
        from runner.policy.models import Policy
        from runner.run.pool import Recipe

        with conn:
            _, uid = paths.peer(conn)
            if uid != os.geteuid():
                return
            conn.settimeout(CLAIM_TIMEOUT)
            try:
                request = json.loads(_read_line(conn))
                workspace = str(request.get("workspace", "none"))
                if workspace not in ("none", "ro", "copy"):
                    raise ValueError(workspace)
                recipe = Recipe(Policy.model_validate(request["policy"]), str(request["image"]),
                                workspace)
            except Exception:
                with contextlib.suppress(OSError):
                    conn.sendall(b'{"ok":false,"error":"bad request"}\n')
                return
            warm = self.pool.claim(recipe)
            if warm is None:
                with contextlib.suppress(OSError):
                    conn.sendall(b'{"ok":false}\n')
                return
            reply = {"ok": True, "container": warm.sandbox.id, "pool_id": warm.pool_id,
                     "key": warm.key, "scratch": str(warm.scratch),
                     "run_dir": str(warm.run_dir), "etc_dir": str(warm.etc_dir),
                     "age": time.monotonic() - warm.created,
                     "workspace_dir": (str(warm.workspace_dir) if warm.workspace_dir is not None
                                       else None)}
            try:
                socket.send_fds(conn, [json.dumps(reply).encode() + b"\n"],
                                [warm.feed.fileno()])
            except OSError:
                warm.discard()  # the worker went away: nobody will use it
                return
            warm.feed.close()  # the worker holds it now


def start_keeper(server_socket: Path, close_fds: tuple[int, ...] = ()) -> int:
    """Fork the keeper; return its pid."""
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for fd in close_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            os.setsid()
            keeper = Keeper(keeper_path(server_socket), server)

            def stop(signum: int, frame: Any) -> None:
                keeper.stopping.set()

            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, stop)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = keeper.serve()
        except BaseException:
            with contextlib.suppress(Exception):
                import traceback

                traceback.print_exc()
        finally:
            os._exit(code)
    return pid


# -- the worker's side -----------------------------------------------------------------


class RemotePool:
    """A worker's view of the keeper: `claim` as `Pool.claim`, None on any trouble."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def claim(self, recipe: Any) -> Any:
        from runner.engines import get_engine
        from runner.run.gc import OWNER_FILE
        from runner.run.owner import owner_label
        from runner.run.pool import WarmSandbox

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            sock.settimeout(CLAIM_TIMEOUT)
            sock.connect(str(self.path))
            request = {"policy": recipe.policy.model_dump(mode="json"), "image": recipe.image,
                       "workspace": recipe.workspace}
            sock.sendall(json.dumps(request).encode() + b"\n")
            data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
            while data and not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                more = sock.recv(65536)
                if not more:
                    break
                data += more
            reply = json.loads(data or b"{}")
            if not reply.get("ok") or len(fds) != 1:
                return None
            feed = socket.socket(fileno=fds.pop())
            scratch = Path(reply["scratch"])
            # The sandbox is this process's run's now: gc judges it by this process.
            (scratch / OWNER_FILE).write_text(owner_label())
            sandbox = get_engine().adopt(str(reply["container"]))
            return WarmSandbox(str(reply["key"]), str(reply["pool_id"]), sandbox, scratch,
                               Path(reply["run_dir"]), Path(reply["etc_dir"]), feed,
                               created=time.monotonic() - float(reply.get("age") or 0),
                               workspace_dir=(Path(reply["workspace_dir"])
                                              if reply.get("workspace_dir") else None))
        except Exception:
            return None
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            sock.close()
