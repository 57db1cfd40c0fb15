"""A byte stream on an asyncio Protocol: what the gateway's server and upstream client read
and write through.

asyncio's StreamReader/StreamWriter (server side) and anyio's streams (httpcore's
client side) each add a layer of futures, cancel scopes and checks per read and per
write; at a provider call every millisecond, those layers were a fifth of what the
gateway cost. This keeps only what both sides need: a receive buffer with a waiter,
flow control both ways, and the connection's state as the loop last saw it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

# Reading from the socket pauses while this much waits to be consumed, so a fast peer
# cannot fill memory ahead of a slow one; it resumes below a quarter of it.
HIGH_WATER = 256 * 1024


class StreamProtocol(asyncio.Protocol):
    def __init__(self, on_connect: Callable[[StreamProtocol], None] | None = None, *,
                 half_close: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self._half_close = half_close
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.lost: BaseException | None = None
        self._on_connect = on_connect
        self._reader: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused_reading = False

    # -- callbacks from the loop ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake_reader()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake_reader()
        # True keeps our side open to answer a peer that only ended its own; else the
        # transport closes itself.
        return True if self._half_close else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake_reader()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(exc or ConnectionResetError("connection lost"))
            self._drain.exception()  # retrieved: nobody may be waiting on it

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- for the connection's owner -----------------------------------------------------

    @property
    def at_end(self) -> bool:
        """Nothing more will come: the peer ended its side or the connection is gone."""
        return self.eof or self.closed

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Up to `max_bytes` once any are there; b"" at the peer's end of stream, or the
        error the connection was lost with; TimeoutError after `timeout` seconds of
        waiting. (A bare timer rather than asyncio.timeout: this waits once per chunk.)"""
        while not self.buffer:
            if self.at_end:
                if self.lost is not None:
                    raise self.lost
                return b""
            loop = asyncio.get_running_loop()
            reader = self._reader = loop.create_future()
            timer = None if timeout is None else loop.call_later(
                timeout, _expire, reader)
            try:
                await reader
            finally:
                self._reader = None
                if timer is not None:
                    timer.cancel()
        if len(self.buffer) <= max_bytes:
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(self.buffer[:max_bytes])
            del self.buffer[:max_bytes]
        if self._paused_reading and len(self.buffer) <= HIGH_WATER // 4 and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        if self._drain is not None and not self._drain.done():
            await asyncio.shield(self._drain)
        elif self.closed and self.lost is not None:
            raise self.lost

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _expire(reader: asyncio.Future[None]) -> None:
    if not reader.done():
        reader.set_exception(TimeoutError("read timed out"))
