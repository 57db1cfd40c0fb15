"""The HTTP face of the run's MCP server: token check, one path, loopback Host headers."""

from __future__ import annotations

from collections.abc import Callable

from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.mcp.auth import BearerGuard, RejectHook
from runner.mcp.http_limits import BodyGuard, HttpGuard

URL_PATH = "/mcp"

# The agent reaches the server through the shim at http://127.0.0.1:<port>, so Host is a
# loopback name. The SDK's DNS-rebinding check stays on (a browser in the sandbox must not
# be turned against it) but accepts those names, with or without a port.
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
LOOPBACK_ONLY = TransportSecuritySettings(
    enable_dns_rebinding_protection=True,
    allowed_hosts=[h for host in _LOOPBACK for h in (host, f"{host}:*")],
    allowed_origins=[o for host in _LOOPBACK for o in (f"http://{host}", f"http://{host}:*")],
)


def build_app(
    manager: StreamableHTTPSessionManager,
    token: str,
    on_reject: RejectHook,
    accepting: Callable[[], bool],
    guard: HttpGuard,
) -> ASGIApp:
    """`accepting` turns False when the server is closing: the manager is being left and
    cannot take requests any more. `guard`: the run's limits on request bodies."""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != URL_PATH:
            await _empty(send, 404)
        elif not accepting():
            await _empty(send, 503)
        else:
            await manager.handle_request(scope, receive, send)

    # The token is checked before routing: any request without it, on any path, is recorded
    # (and its body never read).
    return BearerGuard(BodyGuard(route, guard), token, on_reject)


async def _empty(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
