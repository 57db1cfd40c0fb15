"""An HTTP server on a unix socket, embedded in the host's event loop.

uvicorn serves the ASGI app; it is told to leave the host process alone: no signal
handlers (the orchestrator owns Ctrl-C and SIGTERM, and several runs share one
process), no logging configuration, no access log (the event log is the record).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

# How long open connections (an agent's SSE stream) may take to finish at shutdown.
GRACEFUL_SHUTDOWN_S = 2


def bind_unix_socket(path: Path) -> socket.socket:
    """Bind `path`, replacing a stale socket but never another kind of file, mode 0666.

    The mode is wide because the sandbox's uid differs from the host's: access is decided
    by which sandbox the socket's directory is mounted into, and by the bearer token.
    """
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
        else:
            raise FileExistsError(f"{path} exists and is not a socket")
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class EmbeddedServer(uvicorn.Server):
    def __init__(self, app: ASGIApp, http: type[asyncio.Protocol] | str = "h11",
                 backlog: int = 2048) -> None:
        """`http`: the h11 protocol class (runner/mcp/http_limits.py puts the run's limits
        on connections in one). `backlog`: also how many connections asyncio accepts in
        one go, before any of them can be refused: the descriptors a burst can hold."""
        config = uvicorn.Config(
            app,
            lifespan="off",  # the caller runs the app's lifecycle itself
            log_config=None,
            access_log=False,
            http=http,
            backlog=backlog,
            ws="none",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()
