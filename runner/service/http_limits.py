"""The service's HTTP connections, bounded before any request reaches the app.

uvicorn, as configured by default, lets anyone who can open a connection (no key is
needed to send bytes) hold host resources without limit: with httptools (picked
whenever it is installed) a request line and headers grow without a cap (measured:
184 MB of URL held by one connection, +280 MB of service memory), and no parser has a
deadline for a request to arrive, so 3,000 connections that send half a head, or a
request body one byte short, were all still held after 60 s, each with a descriptor
and up to a 1 MiB body. The descriptors are the ones the runs' gateways, logs and
database need.

This protocol is uvicorn's h11 one with three bounds:

- the request head: h11's own cap (`HEAD_BYTES`), answered 431/400 and closed;
- a deadline for each request, from its first byte (or from the connection's start)
  until its body is complete (`REQUEST_TIMEOUT`): past it the connection is answered
  408 if nothing was answered yet, and closed; a stalled body's memory goes with it.
  A response being streamed (an event stream) has no deadline: its request is whole;
- connections at once (`max_connections`, from the process's descriptor limit): more
  are closed as they are accepted, so the runs always keep descriptors of their own.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_BYTES = 64 << 10
REQUEST_TIMEOUT = 30.0
CONNECTIONS_CAP = 4096


def max_connections() -> int:
    """At most a quarter of the descriptors this process may open, and 4,096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CONNECTIONS_CAP
    return max(16, min(CONNECTIONS_CAP, soft // 4))


_LATE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
         b"content-length: 53\r\nconnection: close\r\n\r\n"
         b'{"error": "the request did not arrive in time (408)"}')

# h11 states in which the peer's current request is not yet whole.
_ARRIVING = (h11.IDLE, h11.SEND_BODY)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request deadline and a connection cap."""

    request_timeout = REQUEST_TIMEOUT
    max_connections = CONNECTIONS_CAP

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._since: float | None = None
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.close()
            return
        self._since = self.loop.time()  # the first request's head is due
        self._watch = self.loop.call_later(self.request_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._since is None and self.conn.their_state in _ARRIVING:
            self._since = self.loop.time()
        super().data_received(data)
        self._settle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Bytes of the next request that came while this one was answered (pipelined)
        # start its deadline now; a connection with none is idle, and keep-alive's.
        if self.conn.their_state in _ARRIVING and self.conn.trailing_data[0]:
            self._since = self.loop.time()
        else:
            self._since = None
        self._settle()

    def _settle(self) -> None:
        if self.conn.their_state not in _ARRIVING:
            self._since = None  # the request is whole: what follows is the app's time

    def _check(self) -> None:
        self._watch = None
        if self.transport.is_closing():
            return
        delay = self.request_timeout
        if self._since is not None:
            delay = self._since + self.request_timeout - self.loop.time()
            if delay <= 0:
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # nothing answered yet
                    self.transport.write(_LATE)
                self.transport.close()
                return
        self._watch = self.loop.call_later(delay, self._check)


def protocol_class(request_timeout: float = REQUEST_TIMEOUT,
                   connections: int | None = None) -> type[BoundedH11Protocol]:
    """The protocol with these bounds (a class: uvicorn makes one per connection)."""
    return type("ServiceH11Protocol", (BoundedH11Protocol,), {
        "request_timeout": request_timeout,
        "max_connections": connections if connections is not None else max_connections()})
