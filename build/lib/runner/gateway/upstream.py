"""The gateway's client to the provider: httpcore's HTTP/1.1 connections, pooled here.

httpcore is httpx's own transport layer (same project; h11 for HTTP/1.1, the standard
library for TLS). The gateway needs none of what httpx adds on top (request and URL
models, cookies, auth flows, redirects, decoders), and per request those layers, and
httpcore's general-purpose pool with its locks and events, cost more than the gateway's
own checks. What stays as httpx would do it: TLS verified against httpx's default trust
store, no redirects, no proxies from the environment, HTTP/1.1, keep-alive for 5 s,
the same timeouts, at most 64 connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import httpx

from runner.errors import NotReady
from runner.gateway.asyncio_backend import AsyncioBackend
from runner.gateway.headers import first_header

CONNECT_TIMEOUT, READ_TIMEOUT, WRITE_TIMEOUT, POOL_TIMEOUT = 15.0, 600.0, 60.0, 30.0
_TIMEOUTS = {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT, "write": WRITE_TIMEOUT,
             "pool": POOL_TIMEOUT}
KEEPALIVE_EXPIRY = 5.0

# Everything httpcore raises for a request that did not complete.
_ERRORS: tuple[type[Exception], ...] = (
    httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
    httpcore.ProxyError, httpcore.UnsupportedProtocol, httpcore.PoolTimeout,
)
_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_AUTHORITY_END = re.compile(r"[/?#]")


class UpstreamError(Exception):
    """The provider could not be reached, or the exchange broke off."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.kind = type(cause).__name__


# What iterating a response's `stream` raises when the exchange breaks off. The stream
# is httpcore's own, not wrapped: a generator layer per chunk showed in the profile.
STREAM_ERRORS: tuple[type[Exception], ...] = (UpstreamError, *_ERRORS)


def error_kind(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, UpstreamError) else type(exc).__name__


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order
    stream: AsyncIterable[bytes]  # raises one of STREAM_ERRORS if cut off
    _release: Callable[[], Awaitable[None]] = field(repr=False)
    _closed: bool = field(default=False, repr=False)

    def header(self, name: str) -> str | None:
        return first_header(self.headers, name)

    async def aclose(self) -> None:
        """Once: ends the exchange and hands the connection back (or closes it)."""
        if not self._closed:
            self._closed = True
            await self._release()


@dataclass(frozen=True)
class _Origin:
    scheme: bytes
    host: bytes
    port: int
    host_header: str


class UpstreamClient:
    def __init__(self, *, ca_file: Path | None = None, max_connections: int = 64,
                 max_idle: int = 16) -> None:
        # trust_env=False: SSL_CERT_FILE/SSL_CERT_DIR in the host's environment must not
        # choose who may receive the key; extra authorities come only from the policy.
        self._ssl = httpx.create_ssl_context(trust_env=False)
        if ca_file is not None:
            try:
                self._ssl.load_verify_locations(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise NotReady(f"provider.ca_file {ca_file}: cannot load certificate "
                               f"authorities: {exc}") from exc
        self._ssl.set_alpn_protocols(["http/1.1"])
        self._backend = AsyncioBackend()
        self._max_idle = max_idle
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[_Origin, list[httpcore.AsyncHTTP11Connection]] = {}
        self._origins: dict[str, _Origin] = {}
        self._closed = False

    def _split(self, url: str) -> tuple[_Origin, str]:
        """The URL's origin (parsed once per origin) and its target, taken verbatim."""
        m = _AUTHORITY_END.search(url, url.find("://") + 3)
        base, target = (url[:m.start()], url[m.start():]) if m else (url, "")
        if not target.startswith("/"):
            target = "/" + target
        origin = self._origins.get(base)
        if origin is None:
            parsed = httpcore.URL(base)
            scheme = parsed.scheme
            if scheme not in _DEFAULT_PORTS:
                raise UpstreamError(httpcore.UnsupportedProtocol(
                    f"the upstream URL has scheme {scheme!r}; http or https is needed"))
            port = parsed.port or _DEFAULT_PORTS[scheme]
            host = parsed.host.decode("ascii")
            header = f"[{host}]" if ":" in host else host
            if port != _DEFAULT_PORTS[scheme]:
                header = f"{header}:{port}"
            origin = self._origins[base] = _Origin(scheme, parsed.host, port, header)
        return origin, target.split("#", 1)[0]

    async def _checkout(self, origin: _Origin) -> httpcore.AsyncHTTP11Connection:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.is_available() and not conn.has_expired():
                return conn
            await conn.aclose()  # closes the transport; nothing to wait for
        # A new connection, opened here rather than by httpcore's AsyncHTTPConnection:
        # that wrapper's lock (anyio's, which yields to the loop even when free) put a
        # turn of the event loop in front of every request.
        host = origin.host.decode("ascii")
        stream = await self._backend.connect_tcp(host, origin.port, timeout=CONNECT_TIMEOUT)
        if origin.scheme == b"https":
            stream = await stream.start_tls(self._ssl, server_hostname=host,
                                            timeout=CONNECT_TIMEOUT)
        return httpcore.AsyncHTTP11Connection(
            httpcore.Origin(origin.scheme, origin.host, origin.port), stream,
            keepalive_expiry=KEEPALIVE_EXPIRY)

    async def _release(self, origin: _Origin, conn: httpcore.AsyncHTTP11Connection,
                       response: httpcore.Response) -> None:
        try:
            await response.aclose()
        finally:
            await self._checkin(origin, conn)

    async def _checkin(self, origin: _Origin, conn: httpcore.AsyncHTTP11Connection) -> None:
        self._slots.release()
        idle = self._idle.setdefault(origin, [])
        if not self._closed and conn.is_idle() and len(idle) < self._max_idle:
            idle.append(conn)
        else:
            await conn.aclose()

    async def send(self, method: str, url: str, headers: Sequence[tuple[str, str]],
                   content: bytes | None) -> UpstreamResponse:
        origin, target = self._split(url)
        # What httpx would add: Host first, and a length for a body.
        framed = [("host", origin.host_header), *headers]
        if content is not None:
            framed.append(("content-length", str(len(content))))
        request = httpcore.Request(
            method, httpcore.URL(scheme=origin.scheme, host=origin.host, port=origin.port,
                                 target=target),
            headers=framed, content=content, extensions={"timeout": _TIMEOUTS})
        if self._slots.locked():
            try:
                async with asyncio.timeout(POOL_TIMEOUT):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise UpstreamError(httpcore.PoolTimeout(
                    f"no upstream connection free within {POOL_TIMEOUT:g} s")) from exc
        else:
            await self._slots.acquire()  # free: returns at once
        conn: httpcore.AsyncHTTP11Connection | None = None
        try:
            conn = await self._checkout(origin)
            response = await conn.handle_async_request(request)
        except BaseException as exc:
            self._slots.release()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.aclose()
            if isinstance(exc, _ERRORS):
                raise UpstreamError(exc) from exc
            raise
        headers_out = [(k.decode("latin-1").lower(), v.decode("latin-1"))
                       for k, v in response.headers]
        stream = response.stream
        assert isinstance(stream, AsyncIterable)
        return UpstreamResponse(response.status, headers_out, stream,
                                functools.partial(self._release, origin, conn, response))

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.aclose()
        self._idle.clear()
