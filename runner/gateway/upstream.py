"""The gateway's client to the provider: HTTP/1.1 on h11 over asyncio, with a keep-alive pool.

Why not httpx here: the gateway adds its cost to every request the agent makes, and
httpx's layers (models, auth and redirect machinery, httpcore, anyio) were most of
it, for features the gateway turns off (no redirects, proxies, cookies or HTTP/2).
What it keeps from httpx is what matters for safety and for the callers:

- TLS exactly as httpx does it: `httpx.create_ssl_context()` (certifi roots, hostname
  checks), ALPN `http/1.1`, SNI from the URL's host;
- the same timeouts (`httpx.Timeout`: connect, read per read, write, pool) and the
  same exception classes (`httpx.ConnectError`, `ReadTimeout`, `RemoteProtocolError`,
  ...), so callers catch `httpx.HTTPError` as before;
- bodies decoded by httpx's own content decoders (gzip, deflate, and br or zstd when
  installed), so usage metering reads plain bytes whatever the upstream sent.

Per request: the request line, headers and body go out in one write. Body bytes are
handed on as soon as they have been read, never held for the next read: the chunks
(or SSE events) that arrived together in one read are handed on together. Idle
connections are reused for a few seconds, and never after the server closed them or
sent anything unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx

READ_SIZE = 64 * 1024
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept (httpx's default)


def _decoder(encodings: list[str]) -> Any:
    from httpx._decoders import SUPPORTED_DECODERS, IdentityDecoder, MultiDecoder

    # As httpx: every known coding in the header, in order; unknown ones pass as they are.
    decoders = [SUPPORTED_DECODERS[e]() for e in encodings if e in SUPPORTED_DECODERS]
    if not decoders:
        return IdentityDecoder()
    return decoders[0] if len(decoders) == 1 else MultiDecoder(decoders)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        """An idle connection the server has not closed, and that holds nothing unasked."""
        if self.writer.is_closing() or self.reader.at_eof() or len(getattr(self.reader, "_buffer", b"")):
            return False  # closed by the server, or it sent bytes nobody asked for
        if time.monotonic() - self.idle_since > KEEPALIVE_EXPIRY:
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable  # EOF, a TLS close_notify or stray bytes: not reusable

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Headers:
    """A response's headers as h11 parsed them (names lower case), read as httpx reads them."""

    __slots__ = ("_items",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._items = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]

    def get_list(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k == name]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.get_list(name)
        return ", ".join(values) if values else default  # as httpx joins repeated headers

    def multi_items(self) -> list[tuple[str, str]]:
        return list(self._items)


@dataclass
class UpstreamResponse:
    status_code: int
    headers: Headers
    _pool: UpstreamPool
    _key: tuple[str, str, int]
    _conn: _Conn | None
    _timeout: httpx.Timeout
    _coalesce: bool = True
    _done: bool = False
    _decoder: Any = field(default=None, repr=False)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body, decoded, chunk by chunk as it arrives."""
        conn = self._conn
        if conn is None:
            return
        if self._decoder is None:
            codings = [c.strip().lower() for c in
                       ",".join(self.headers.get_list("content-encoding")).split(",")
                       if c.strip()]
            self._decoder = _decoder(codings)
        decoder = self._decoder
        pending: list[bytes] = []  # body bytes of what has been read so far, not yet handed on
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    if pending:  # all that arrived is handed on before waiting for more
                        out = decoder.decode(b"".join(pending))
                        pending.clear()
                        if out:
                            yield out
                    conn.h11.receive_data(await _read(conn, self._timeout))
                    continue
                if isinstance(event, h11.Data):
                    pending.append(bytes(event.data))
                    if not self._coalesce:  # one chunk per upstream chunk (recordings)
                        out = decoder.decode(b"".join(pending))
                        pending.clear()
                        if out:
                            yield out
                elif isinstance(event, h11.EndOfMessage):
                    out = decoder.decode(b"".join(pending)) + decoder.flush()
                    pending.clear()
                    if out:
                        yield out
                    self._done = True
                    self._release()
                    return
                else:  # ConnectionClosed before the end of the body
                    raise httpx.RemoteProtocolError("the upstream closed the connection "
                                                    "before the end of the response")
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None
        except httpx.DecodingError:
            raise
        except ValueError as exc:  # a content decoder that could not decode
            raise httpx.DecodingError(str(exc)) from None
        finally:
            if not self._done:
                self._discard()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        h = conn.h11
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                self._pool._lost(conn)
                return
            conn.idle_since = time.monotonic()
            self._pool._put(self._key, conn)
        else:
            self._pool._lost(conn)

    def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._lost(conn)

    async def aclose(self) -> None:
        """Give the connection back if the body was read to the end, else close it."""
        if not self._done:
            self._discard()


async def _read(conn: _Conn, timeout: httpx.Timeout) -> bytes:
    try:
        async with asyncio.timeout(timeout.read):
            return await conn.reader.read(READ_SIZE)
    except TimeoutError:
        raise httpx.ReadTimeout("timed out reading from the upstream") from None
    except (OSError, ssl.SSLError) as exc:
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None


class UpstreamPool:
    """Keep-alive connections per (scheme, host, port); at most `max_connections` open."""

    def __init__(self, *, timeout: httpx.Timeout, max_connections: int = 64,
                 max_keepalive: int = 16, ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context`: for tests with their own CA; by default httpx's (certifi)."""
        self.timeout = timeout
        self.max_keepalive = max_keepalive
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._slots = asyncio.Semaphore(max_connections)  # one per open connection
        self._ssl = ssl_context
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(trust_env=False)
        self._ssl.set_alpn_protocols(["http/1.1"])
        return self._ssl

    # -- connections ------------------------------------------------------------------

    async def _get(self, key: tuple[str, str, int]) -> _Conn:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            self._lost(conn)
        if self._slots.locked():  # make room by closing idle connections to elsewhere
            for conns in self._idle.values():
                while conns and self._slots.locked():
                    self._lost(conns.pop())
        try:
            async with asyncio.timeout(self.timeout.pool):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no upstream connection became free") from None
        try:
            return await self._connect(key)
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self, key: tuple[str, str, int]) -> _Conn:
        scheme, host, port = key
        tls = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(self.timeout.connect):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None,
                    limit=READ_SIZE)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}") from None
        return _Conn(reader, writer)

    def _put(self, key: tuple[str, str, int], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if self._closed or len(idle) >= self.max_keepalive:
            self._lost(conn)
        else:
            idle.append(conn)

    def _lost(self, conn: _Conn) -> None:
        conn.close()
        self._slots.release()

    # -- requests ---------------------------------------------------------------------

    async def request(self, method: str, url: str, headers: list[tuple[str, str]],
                      content: bytes | None = None, *, coalesce: bool = True
                      ) -> UpstreamResponse:
        """Send a request; return once the response's status and headers are in.

        `coalesce`: the body chunks that arrived in one read are handed on as one;
        without it, one per chunk of the upstream's framing (what a recording keeps)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"cannot reach {url!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, parts.hostname, port)
        authority = parts.netloc.rsplit("@", 1)[-1]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        out_headers = [("host", authority)]
        out_headers += [(k, v) for k, v in headers if k.lower() not in ("host", "content-length")]
        if content is not None:
            out_headers.append(("content-length", str(len(content))))
        try:  # validated before any connection is taken: no header smuggling upstream
            request = h11.Request(method=method, target=target, headers=out_headers)
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        conn = await self._get(key)
        try:
            response = await self._exchange(conn, key, request, content)
        except BaseException:
            self._lost(conn)
            raise
        response._coalesce = coalesce
        return response

    async def _exchange(self, conn: _Conn, key: tuple[str, str, int], request: h11.Request,
                        content: bytes | None) -> UpstreamResponse:
        h = conn.h11
        try:
            data = h.send(request) or b""
            if content:
                data += h.send(h11.Data(data=content)) or b""
            data += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        conn.writer.write(data)  # one write: request line, headers and body together
        try:
            async with asyncio.timeout(self.timeout.write):
                await conn.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("timed out writing to the upstream") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.WriteError(f"{type(exc).__name__}: {exc}") from None
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from None
            if event is h11.NEED_DATA:
                h.receive_data(await _read(conn, self.timeout))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return UpstreamResponse(event.status_code, Headers(list(event.headers)), self,
                                        key, conn, self.timeout)
            if isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            raise httpx.RemoteProtocolError(f"unexpected {type(event).__name__} from the upstream")

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            while conns:
                self._lost(conns.pop())
        self._idle.clear()
