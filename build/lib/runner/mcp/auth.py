"""The per-run bearer token in front of the run's MCP endpoint.

The socket is bind-mounted into one run's sandbox only, and the token is a second lock:
a request that reaches the socket some other way (another run's sandbox through a
mistaken mount, a host process) and lacks this run's token gets 401 and an event.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

# Called with (reason, method, path); reason is "missing" or "invalid".
RejectHook = Callable[[str, str, str], None]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def check_token(token: str) -> None:
    # It travels in an HTTP header and an environment variable: printable ASCII, no spaces.
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("the MCP bearer token must be non-empty printable ASCII without spaces")


class BearerGuard:
    """ASGI middleware: only requests with `Authorization: Bearer <token>` reach `app`."""

    def __init__(self, app: ASGIApp, token: str, on_reject: RejectHook) -> None:
        check_token(token)
        self._app = app
        self._expected = token.encode()
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        reason = self._verdict(scope)
        if reason is None:
            await self._app(scope, receive, send)
            return
        self._on_reject(reason, scope.get("method", ""), scope.get("path", ""))
        body = json.dumps({"error": "unauthorized"}).encode()
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Bearer realm="airlock-mcp"'),
            ],
        })
        await send({"type": "http.response.body", "body": body})

    def _verdict(self, scope: Scope) -> str | None:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return "missing"
        scheme, _, presented = values[0].partition(b" ")
        # compare_digest keeps the comparison's time independent of how much of it matched.
        ok = (
            len(values) == 1
            and scheme.lower() == b"bearer"
            and hmac.compare_digest(presented.strip(), self._expected)
        )
        return None if ok else "invalid"
