"""An httpcore network backend on plain asyncio transports, for the gateway's upstream.

httpcore's own backend for asyncio goes through anyio: a cancel scope per read and
per write, and a poll() system call per request to see whether an idle connection was
closed. At a provider call every millisecond that was a large share of what the
gateway cost, so this backend does the same on an asyncio Protocol instead: reads wait
on a future with a bare timer for their timeout, and whether an idle connection has
data or was closed is already known from the protocol's callbacks. TLS is the standard library's
(`loop.start_tls`), verified with the context httpcore passes.

Writes are held until the connection next reads, so a request's head and body leave
in one send (the provider is woken once per request, not twice); reading pauses while
a quarter MiB waits to be relayed (`StreamProtocol`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore

from runner.gateway.stream_protocol import StreamProtocol

FLUSH_AT = 64 * 1024


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, protocol: StreamProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._write_timeout: float | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._pending:
            await self._flush()
        try:
            return await self._protocol.read(max_bytes, timeout)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._pending.append(buffer)
        self._pending_size += len(buffer)
        self._write_timeout = timeout
        if self._pending_size >= FLUSH_AT:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            self._protocol.write(data)
            async with asyncio.timeout(self._write_timeout):
                await self._protocol.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._pending.clear()
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        await self._flush()
        if self._protocol.buffer or self._protocol.at_end:
            # Bytes that came in the clear before the handshake must never be read as
            # if they had come over TLS.
            self._transport.close()
            raise httpcore.ConnectError("the server sent data before the TLS handshake")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(self._transport, self._protocol, ssl_context,
                                                 server_hostname=server_hostname)
        except TimeoutError as exc:
            self._transport.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        transport = cast(asyncio.Transport, transport)
        self._protocol.transport = transport
        return AsyncioStream(transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # Only asked of an idle connection: anything there, or its end, means the
            # server closed it (or broke the protocol); either way it cannot be reused.
            return bool(self._protocol.buffer) or self._protocol.at_end
        key = {"ssl_object": "ssl_object", "client_addr": "sockname",
               "server_addr": "peername", "socket": "socket"}.get(info)
        return self._transport.get_extra_info(key) if key else None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        return await self._connect(
            lambda: loop.create_connection(StreamProtocol, host, port, local_addr=local),
            socket_options, timeout)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        return await self._connect(lambda: loop.create_unix_connection(StreamProtocol, path),
                                   socket_options, timeout)

    @staticmethod
    async def _connect(open_: Any, socket_options: Iterable[Any] | None,
                       timeout: float | None) -> AsyncioStream:
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await open_()
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc) or "connect timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
