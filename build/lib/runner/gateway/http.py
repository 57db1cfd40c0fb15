"""A small asyncio HTTP/1.1 server for the gateway's unix socket.

Why not uvicorn: the gateway needs exactly one thing from a server, and needs it
reliably: write each response chunk to the socket as soon as the upstream hands it
over, with a finaliser that always runs, whether the client read to the end, went
away mid-stream or never got the headers. Requests are parsed by llhttp (httptools,
the parser uvicorn uses); responses are framed here (a status line, checked headers,
a length or chunks); this module also does the loop, keep-alive, `Expect:
100-continue`, caps on the request head and body, and a clean shutdown that cancels
live connections. (It was h11 before: parsing and framing in pure Python were a
fifth of the gateway's time per request.)

Writes made in one turn of the event loop leave in one send: bytes are queued and
flushed by a callback scheduled for the loop's next turn, which runs before the loop
waits for anything. A response whose headers, body and end are all at hand goes out
as one send (one wake-up of the client instead of three); a chunk of a stream is
never held for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import time
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import httptools

from runner.gateway.headers import first_header
from runner.gateway.stream_protocol import StreamProtocol

READ_SIZE = 64 * 1024
FLUSH_NOW = 64 * 1024  # queued bytes past this are written at once, then drained
MAX_BODY = 64 * 1024 * 1024  # requests carry whole conversations and images, not more
MAX_HEAD = 64 * 1024  # request line and headers (and, apart, a chunked body's trailers)
MAX_CONNECTIONS = 256  # from one sandbox at once; more are closed as they come
IDLE_TIMEOUT = 900.0  # seconds a connection may wait between requests (agents think)
SWEEP_EVERY = 60.0  # how often idle connections are looked for (no timer per request)

# What may be written as a header: a token for the name; for the value, visible
# characters, spaces and tabs (no CR, LF or NUL: a response cannot be split).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass
class Request:
    method: str
    target: str  # as sent: path plus query
    headers: list[tuple[str, str]]  # names lower-cased, in order

    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    def header(self, name: str) -> str | None:
        return first_header(self.headers, name)


Finaliser = Callable[[BaseException | None], Awaitable[None]]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    # bytes are sent with a Content-Length; an async iterable is sent chunk by chunk
    # (chunked transfer encoding), each chunk flushed before the next is awaited.
    body: bytes | AsyncIterable[bytes] = b""
    # Called exactly once after the exchange, with the error that cut it short if any,
    # so the handler can close its upstream stream and account for the request.
    finalise: Finaliser | None = None


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, *, max_body: int = MAX_BODY) -> None:
        self.handler = handler
        self.max_body = max_body
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._open: set[_Connection] = set()
        self._finals: set[asyncio.Future[None]] = set()
        self._unix_path: Path | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start_unix(self, path: Path, mode: int = 0o666) -> None:
        """Bind `path` (replacing a stale socket) and make it connectable by `mode`.

        0666 because the sandbox's uid differs from the host's; who can reach the
        socket is decided by where it is bind-mounted, not by its mode.
        """
        if len(os.fsencode(path)) > 107:
            raise OSError(f"unix socket path too long for AF_UNIX: {path}")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._protocol, path=str(path))
        os.chmod(path, mode)
        self._unix_path = path
        self._sweep()

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port)
        self._sweep()
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Close connections that have waited longer than IDLE_TIMEOUT between requests."""
        now = time.monotonic()
        for conn in list(self._open):
            if conn.idle_since is not None and now - conn.idle_since > IDLE_TIMEOUT:
                conn.proto.close()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_EVERY, self._sweep)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._finals:
            await asyncio.gather(*self._finals, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
            self._unix_path = None

    def _protocol(self) -> StreamProtocol:
        # half_close: a client that ends its side after the request still gets the answer
        return StreamProtocol(on_connect=self._on_connect, half_close=True)

    def _on_connect(self, proto: StreamProtocol) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            proto.close()  # each connection costs a descriptor and up to a body's memory
            return
        task = asyncio.get_running_loop().create_task(self._serve(proto))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _serve(self, proto: StreamProtocol) -> None:
        conn = _Connection(self, proto)
        self._open.add(conn)
        try:
            try:
                await conn.run()
            finally:
                conn.flush()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # an upstream failure mid-stream ends this
            pass  # connection only (unterminated, so the client sees it); it was recorded
        finally:
            self._open.discard(conn)
            proto.close()


class _Parsed:
    """One request as the parser's callbacks deliver it."""

    __slots__ = ("body", "headers", "keep_alive", "method", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True


class _Connection:
    def __init__(self, server: HttpServer, proto: StreamProtocol) -> None:
        self.server = server
        self.proto = proto
        self.parser = httptools.HttpRequestParser(self)
        self._current: _Parsed | None = None
        self._head_done = False
        self._head_size = 0
        self._msg_size = 0  # bytes fed while the current request was being read
        self._responding = False
        self.idle_since: float | None = None
        self._done: deque[_Parsed] = deque()
        self._error: tuple[int, bytes] | None = None
        self._upgraded = False
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False

    # -- llhttp's callbacks, from inside feed_data --------------------------------------

    def _fail(self, status: int, message: bytes) -> None:
        if self._error is None:
            self._error = (status, message)

    def on_message_begin(self) -> None:
        self._current = _Parsed()
        self._head_done = False
        self._head_size = 0
        self._msg_size = 0

    def on_url(self, url: bytes) -> None:
        if self._current is not None:
            self._current.url += url
            self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._current is None:
            return
        self._head_size += len(name) + len(value) + 4
        if self._head_done:
            # A trailer (after a chunked body): counted, never kept or forwarded.
            if self._head_size > 2 * MAX_HEAD:
                self._fail(431, b"request trailers too large\n")
            return
        self._current.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))
        if self._head_size > MAX_HEAD:
            self._fail(431, b"request head too large\n")

    def on_headers_complete(self) -> None:
        cur = self._current
        if cur is None:
            return
        self._head_done = True
        cur.method = self.parser.get_method().decode("ascii", "replace")
        cur.version = self.parser.get_http_version()
        length = expect = None
        for k, v in cur.headers:
            if k == "content-length":
                length = v
            elif k == "expect":
                expect = v
        if length is not None and length.strip().isdigit() and \
                int(length) > self.server.max_body:
            self._fail(413, b"request body too large\n")  # before the client sends it
        if (expect is not None and expect.strip().lower() == "100-continue"
                and self._error is None and cur.version == "1.1" and not self._done
                and not self._responding):
            # Only for the request whose body is read next: a 100 must not overtake the
            # answer to a request pipelined before it.
            self._queue(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        cur = self._current
        if cur is None or self._error is not None:
            return
        cur.body += body
        if len(cur.body) > self.server.max_body:
            cur.body.clear()
            self._fail(413, b"request body too large\n")

    def on_message_complete(self) -> None:
        cur, self._current = self._current, None
        if cur is not None and self._error is None:  # a request over a cap is not handled
            cur.keep_alive = self.parser.should_keep_alive()
            self._done.append(cur)

    # -- reading ----------------------------------------------------------------------

    async def _next(self) -> _Parsed | None:
        """The next complete request; None once the connection is to end."""
        while True:
            if self._done:
                return self._done.popleft()
            if self._error is not None:
                await self._simple(*self._error)
                return None
            if self._upgraded:
                return None
            if self._current is None:
                self.idle_since = time.monotonic()  # between requests: see _sweep
            data = await self.proto.read(READ_SIZE)
            self.idle_since = None
            if not data:
                return None  # the client's end of stream, between requests or within one
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                # llhttp stops at an Upgrade or CONNECT: that request is answered as an
                # ordinary one (no protocol switch), and then the connection ends.
                self._upgraded = True
            except httptools.HttpParserError:
                self._fail(400, b"bad request\n")
            if self._current is not None:
                # Raw bytes of the request still being read, whatever llhttp holds back
                # (a head, a trailer or a chunk-size line that never ends): capped.
                # What is not body (head, chunk-size lines, trailers) is capped alone.
                self._msg_size += len(data)
                overhead = self._msg_size - len(self._current.body)
                if not self._head_done and overhead > 2 * MAX_HEAD:
                    self._fail(431, b"request head too large\n")
                elif overhead > 4 * MAX_HEAD:
                    self._fail(431, b"request framing or trailers too large\n")

    async def run(self) -> None:
        while True:
            parsed = await self._next()
            if parsed is None:
                return
            request = Request(method=parsed.method,
                              target=parsed.url.decode("ascii", "replace"),
                              headers=parsed.headers, body=bytes(parsed.body))
            self._responding = True
            response = await self.server.handler(request)
            # After a parse error or an upgrade nothing more is read from this stream.
            keep_alive = parsed.keep_alive and self._error is None and not self._upgraded
            await self._respond(response, parsed, keep_alive)
            self._responding = False
            if not keep_alive:
                return

    # -- writing ----------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    async def _send(self, data: bytes) -> None:
        if self.proto.closed:
            raise ConnectionResetError("Connection lost")  # the client went away
        self._queue(data)
        if self._out_size + self.proto.write_buffer_size() >= FLUSH_NOW:
            self.flush()
            await self.proto.drain()  # backpressure: a slow client slows the upstream read

    def flush(self) -> None:
        """Write what is queued, as one send."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        if not self.proto.closed:
            with contextlib.suppress(ConnectionError):
                self.proto.write(data)

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]], framing: list[tuple[str, str]]
              ) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        for k, v in headers:
            if k.lower() in _FRAMING:
                continue
            if not _TOKEN.fullmatch(k) or not _VALUE.fullmatch(v):
                raise ValueError(f"refusing to send a malformed header {k!r}")
            lines.append(f"{k}: {v}\r\n")
        lines.extend(f"{k}: {v}\r\n" for k, v in framing)
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _respond(self, response: Response, parsed: _Parsed, keep_alive: bool) -> None:
        error: BaseException | None = None
        # HTTP/1.0 clients cannot read chunks: a stream to them ends by closing.
        chunked = not isinstance(response.body, bytes) and parsed.version == "1.1"
        no_body = parsed.method == "HEAD" or response.status in (204, 304)
        close = not keep_alive or (not isinstance(response.body, bytes) and not chunked)
        try:
            framing: list[tuple[str, str]] = []
            if isinstance(response.body, bytes):
                framing.append(("content-length", str(len(response.body))))
            elif chunked:
                framing.append(("transfer-encoding", "chunked"))
            if close:
                framing.append(("connection", "close"))
            await self._send(self._head(response.status, response.headers, framing))
            if isinstance(response.body, bytes):
                if response.body and not no_body:
                    await self._send(response.body)
            else:
                proto = self.proto
                async for chunk in response.body:
                    if not chunk or no_body:
                        continue
                    # _send, inlined: this runs once per chunk of every stream.
                    if proto.closed:
                        raise ConnectionResetError("Connection lost")
                    self._queue(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                    if self._out_size + proto.write_buffer_size() >= FLUSH_NOW:
                        self.flush()
                        await proto.drain()
                if chunked and not no_body:
                    await self._send(b"0\r\n\r\n")
            self.flush()  # the response is complete: out now, before the finaliser runs
        except BaseException as exc:
            error = exc
            raise
        finally:
            # A client gone mid-stream leaves the body iterator suspended: close it
            # now rather than at garbage collection.
            aclose = getattr(response.body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if response.finalise is not None:
                # Shielded and tracked: a cancelled connection must still close its
                # upstream stream and write its event; aclose() waits for these.
                final = asyncio.ensure_future(response.finalise(error))
                self.server._finals.add(final)
                final.add_done_callback(self.server._finals.discard)
                await asyncio.shield(final)

    async def _simple(self, status: int, body: bytes) -> None:
        """An error answer before a request could be handled; the connection then ends."""
        with contextlib.suppress(Exception):
            await self._send(self._head(status, [("content-type", "text/plain")], [
                ("content-length", str(len(body))), ("connection", "close")]) + body)
            self.flush()
