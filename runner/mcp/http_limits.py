"""What one run's MCP listener may cost the host: connections, time, request memory.

The listener runs in the host process, next to the run's gateway and every other run's
services, outside the sandbox's own limits; the sandbox can reach its socket directly.
So each run's listener has its own budget:

- at most `connections` open at once: past it a new connection is closed as it is
  accepted (its descriptor is back at once; a burst holds at most `backlog` more), so no
  run can take the process's descriptors from the gateway or from a neighbour;
- a request's headers must be complete within `header_timeout` of the connection (or of
  the previous response), and its body within `request_timeout` of its headers: a
  stalled request is cut off, holding nothing;
- a body may be at most `max_body` bytes, and the bodies held by all of the run's
  requests at once at most `body_memory` bytes: past either the request is refused.

Each drop is an `mcp.dropped` event (clipped and capped by the log); after `abuse` of
them the run's `on_abuse` is called once, and the run ends (exit_reason `mcp_abuse`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from runner.events.log import EventSink


@dataclass(frozen=True)
class HttpLimits:
    connections: int = 32  # the SDK allows 32 sessions; an agent needs one or two
    # The listen backlog, which is also how many connections asyncio accepts in one turn
    # of the loop; a refused one is closed a few turns later (connection_made, then the
    # close, are scheduled), so a burst holds a few backlogs' worth of descriptors.
    backlog: int = 16
    header_timeout: float = 10.0
    request_timeout: float = 20.0
    max_body: int = 1 << 20
    body_memory: int = 4 << 20
    abuse: int = 500  # drops (of any kind) before the run is ended


class HttpGuard:
    """The counters one listener's connections share (all on the services' event loop)."""

    def __init__(self, limits: HttpLimits, sink: EventSink,
                 on_abuse: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self._sink = sink
        self._on_abuse = on_abuse
        self.open = 0  # connections being served
        self.held = 0  # bytes of request bodies held
        self.drops: Counter[str] = Counter()
        self.abused = False

    def drop(self, reason: str, **detail: Any) -> None:
        self.drops[reason] += 1
        self._sink.refusal("mcp.dropped", "mcp", kind=reason, reason=reason, **detail)
        if sum(self.drops.values()) >= self.limits.abuse and not self.abused:
            self.abused = True
            self._sink.emit("mcp.abuse", "mcp", drops=dict(self.drops), limit=self.limits.abuse)
            if self._on_abuse is not None:
                self._on_abuse("mcp_abuse")

    def take(self, n: int) -> bool:
        if self.held + n > self.limits.body_memory:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n


def guarded_protocol(guard: HttpGuard) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection cap and both deadlines of `guard`."""

    class GuardedProtocol(H11Protocol):
        _refused = False  # closed as accepted, past the cap: never served
        _timer: asyncio.TimerHandle | None = None
        _waiting = ""  # which deadline the timer is for

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if guard.open >= guard.limits.connections:
                self._refused = True
                transport.abort()
                guard.drop("connections", open=guard.open, limit=guard.limits.connections)
                return
            guard.open += 1
            super().connection_made(transport)
            self._arm("header_timeout", guard.limits.header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            guard.open -= 1
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self.cycle is not None:
                # A request's headers are in: its body now has its own deadline.
                self._arm("request_timeout", guard.limits.request_timeout)
            if self._timer is not None and self._waiting == "request_timeout" \
                    and self.cycle is not None and not self.cycle.more_body:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle until the next request's headers: the same deadline as a new connection
            # (a client that starts headers and stalls cancels uvicorn's keep-alive timer).
            self._arm("header_timeout", guard.limits.header_timeout)

        def _arm(self, what: str, seconds: float) -> None:
            self._disarm()
            self._waiting = what
            self._timer = self.loop.call_later(seconds, self._expired, what)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self, what: str) -> None:
            self._timer = None
            if self.transport is None or self.transport.is_closing():
                return
            guard.drop(what, seconds=getattr(guard.limits, what))
            self.transport.abort()

    return GuardedProtocol


class BodyGuard:
    """ASGI middleware: reads a request's body within the caps of `guard`, then hands it
    to the app. Memory for it is counted while the app handles the request."""

    def __init__(self, app: ASGIApp, guard: HttpGuard) -> None:
        self._app = app
        self._guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limits, guard = self._guard.limits, self._guard
        declared = _content_length(scope)
        if declared is not None and declared > limits.max_body:
            guard.drop("body_too_large", declared=declared, limit=limits.max_body)
            await _refuse(send, 413)
            return
        held = 0
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                if held + len(chunk) > limits.max_body:
                    guard.drop("body_too_large", received=held + len(chunk),
                               limit=limits.max_body)
                    await _refuse(send, 413)
                    return
                if not guard.take(len(chunk)):
                    guard.drop("body_memory", held=guard.held, limit=limits.body_memory)
                    await _refuse(send, 503)
                    return
                held += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            chunks.clear()
            await self._app(scope, _replay(body, receive), send)
        finally:
            guard.release(held)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None


async def _refuse(send: Send, status: int) -> None:
    # Connection: close: the rest of the body is never read, so the connection cannot
    # carry another request.
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"0"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": b""})
