"""A small asyncio HTTP/1.1 server on h11, for the gateway's unix socket.

Why not uvicorn: the gateway needs exactly one thing from a server, and needs it
reliably: write each response chunk to the socket as soon as the upstream hands it
over (`write` + `drain` per chunk), with a finaliser that always runs, whether the
client read to the end, went away mid-stream or never got the headers. h11 (already
installed with httpx) does the framing; this module does the loop, keep-alive,
`Expect: 100-continue`, a request-body cap, and a clean shutdown that cancels live
connections.

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
import stat
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11

READ_SIZE = 64 * 1024
FLUSH_NOW = 64 * 1024  # queued bytes past this are written at once, then drained
MAX_BODY = 64 * 1024 * 1024  # requests carry whole conversations and images, not more


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
        for k, v in self.headers:
            if k == name:
                return v
        return None


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
        self._finals: set[asyncio.Future[None]] = set()
        self._unix_path: Path | None = None

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
        self._server = await asyncio.start_unix_server(self._on_connect, path=str(path))
        os.chmod(path, mode)
        self._unix_path = path

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._on_connect, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def aclose(self) -> None:
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

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            conn = _Connection(self, reader, writer)
            try:
                await conn.run()
            finally:
                conn.flush()
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # an upstream failure mid-stream ends this
            pass  # connection only (unterminated, so the client sees it); it was recorded
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    def __init__(self, server: HttpServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER)
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False

    async def _next(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._send(h11.InformationalResponse(status_code=100, headers=[]))
            # b"" marks EOF: h11 then reports ConnectionClosed, or an error mid-message.
            self.conn.receive_data(await self.reader.read(READ_SIZE))

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if not data:
            return
        if self.writer.transport.is_closing():
            raise ConnectionResetError("Connection lost")  # the client went away
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size + self.writer.transport.get_write_buffer_size() >= FLUSH_NOW:
            self.flush()
            await self.writer.drain()  # backpressure: a slow client slows the upstream read
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued, as one send."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        if not self.writer.transport.is_closing():
            self.writer.write(data)

    async def run(self) -> None:
        while True:
            try:
                event = await self._next()
            except h11.RemoteProtocolError as exc:
                await self._simple(exc.error_status_hint, b"bad request\n")
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            request = Request(
                method=event.method.decode("ascii", "replace"),
                target=event.target.decode("ascii", "replace"),
                headers=[(k.decode("latin-1").lower(), v.decode("latin-1"))
                         for k, v in event.headers],
            )
            body = bytearray()
            while True:
                try:
                    ev = await self._next()
                except h11.RemoteProtocolError as exc:
                    await self._simple(exc.error_status_hint, b"bad request\n")
                    return
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > self.server.max_body:
                        await self._simple(413, b"request body too large\n")
                        return
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            request.body = bytes(body)
            response = await self.server.handler(request)
            await self._respond(response)
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _respond(self, response: Response) -> None:
        error: BaseException | None = None
        try:
            headers = [(k, v) for k, v in response.headers
                       if k.lower() not in ("content-length", "transfer-encoding", "connection")]
            if isinstance(response.body, bytes):
                headers.append(("content-length", str(len(response.body))))
                await self._send(h11.Response(status_code=response.status, headers=headers))
                if response.body:
                    await self._send(h11.Data(data=response.body))
            else:
                await self._send(h11.Response(status_code=response.status, headers=headers))
                async for chunk in response.body:
                    if chunk:
                        await self._send(h11.Data(data=chunk))
            await self._send(h11.EndOfMessage())
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
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(Exception):
            await self._send(h11.Response(status_code=status, headers=[
                ("content-type", "text/plain"), ("content-length", str(len(body))),
                ("connection", "close")]))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
