"""`airlock view`: the viewer on 127.0.0.1, a random port, behind a per-start token.

The token is the first segment of every path (`http://127.0.0.1:PORT/TOKEN/`), so the
page's own relative requests carry it and no request without it gets anything: the
runs are readable only by whoever was shown the URL. It is compared in constant time,
and the Host header must name this loopback address, which turns away DNS rebinding
(a page elsewhere naming its own host that resolves here).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import socket
import sys
import threading
import webbrowser
from collections.abc import Callable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from runner.view.app import SECURITY_HEADERS, view_app
from runner.view.source import LocalRuns


class TokenGate:
    def __init__(self, app: ASGIApp, token: str, port: int) -> None:
        self.app = app
        self.token = token.encode()
        self.hosts = {f"127.0.0.1:{port}".encode(), f"localhost:{port}".encode()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        first, slash, _ = path[1:].partition("/")
        host = dict(scope["headers"]).get(b"host", b"")
        good = hmac.compare_digest(first.encode("utf-8", "replace"), self.token)
        if not good or host not in self.hosts:
            await _plain(send, 403, b"forbidden: open the URL that `airlock view` printed\n")
            return
        if not slash:  # /TOKEN -> /TOKEN/, so that the page's relative URLs keep the token
            await _plain(send, 308, b"", [(b"location", f"/{first}/".encode())])
            return
        root = scope.get("root_path", "") + "/" + first
        await self.app({**scope, "root_path": root}, receive, send)


async def _plain(send: Send, status: int, body: bytes,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"),
               (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS, *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def has_browser() -> bool:
    """A browser can be shown: not on a headless Linux (no display), not over SSH alone."""
    if sys.platform.startswith("linux") or "bsd" in sys.platform:
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def listen(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def local_app(runs_root: Path, token: str, port: int) -> ASGIApp:
    runs = LocalRuns(runs_root)
    return TokenGate(view_app(lambda request: runs), token, port)


def serve(runs_root: Path, run_id: str | None, *, port: int = 0, browser: bool = True,
          echo: Callable[[str], None] = print, note: Callable[[str], None] = print) -> int:
    """Serve until Ctrl-C (or SIGTERM); print the URL first."""
    import uvicorn

    sock = listen(port)
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(32)
    url = f"http://127.0.0.1:{port}/{token}/" + (f"#/run/{run_id}" if run_id else "")
    # h11 with its head capped: httptools (uvicorn's pick when installed) reads a request
    # line or headers without end, and any local user can connect before the token is
    # checked (measured on the service: one 184 MB URL, +280 MB).
    config = uvicorn.Config(local_app(runs_root, token, port), log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                            server_header=False, http="h11",
                            h11_max_incomplete_event_size=64 << 10)
    server = uvicorn.Server(config)
    note(f"airlock view: the runs in {runs_root}; Ctrl-C stops")
    echo(url)
    if browser and has_browser():
        threading.Timer(0.3, webbrowser.open, args=(url,)).start()
    # uvicorn stops cleanly on Ctrl-C, then raises the signal again for its caller to see.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 0
