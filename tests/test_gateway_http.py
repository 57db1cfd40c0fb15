"""The gateway's HTTP server (`runner.gateway.http`): writes coalesced within one turn of
the loop, yet nothing held back, and a client that stops reading slows the producer."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from runner.gateway.http import HttpServer, Request, Response


def _get(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.sendall(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
    return s


def test_a_small_response_leaves_in_one_send(tmp_path: Path):
    async def handler(req: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"hello"

        return Response(200, [("content-type", "text/plain")], body())

    async def main() -> None:
        server = HttpServer(handler)
        await server.start_unix(tmp_path / "s.sock")
        s = await asyncio.to_thread(_get, tmp_path / "s.sock")
        await asyncio.sleep(0.3)
        first = await asyncio.to_thread(s.recv, 65536)
        assert first.startswith(b"HTTP/1.1 200")
        assert first.endswith(b"5\r\nhello\r\n0\r\n\r\n")  # headers, body and end together
        s.close()
        await server.aclose()

    asyncio.run(main())


def test_stream_chunks_are_not_held_back(tmp_path: Path):
    async def handler(req: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await asyncio.sleep(1.0)
            yield b"second"

        return Response(200, [], body())

    async def main() -> None:
        server = HttpServer(handler)
        await server.start_unix(tmp_path / "s.sock")
        s = await asyncio.to_thread(_get, tmp_path / "s.sock")
        t0 = time.monotonic()
        got = b""
        while b"first" not in got:
            got += await asyncio.to_thread(s.recv, 65536)
        assert time.monotonic() - t0 < 0.5
        s.close()
        await server.aclose()

    asyncio.run(main())


def test_a_client_that_does_not_read_slows_the_producer(tmp_path: Path):
    produced = 0

    async def handler(req: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            nonlocal produced
            chunk = b"x" * 16384
            for _ in range(4096):  # 64 MiB if nothing pushed back
                produced += len(chunk)
                yield chunk

        return Response(200, [], body())

    async def main() -> None:
        server = HttpServer(handler)
        await server.start_unix(tmp_path / "s.sock")
        s = await asyncio.to_thread(_get, tmp_path / "s.sock")
        await asyncio.sleep(1.0)  # the client reads nothing
        assert produced < 8 * 2**20, produced
        s.close()
        await server.aclose()

    asyncio.run(main())


# -- requests as clients send them, and what the server answers ------------------------

def _echo(req: Request) -> Response:
    return Response(200, [("content-type", "text/plain"), ("x-method", req.method)],
                    f"{req.method} {req.target} {len(req.body)}".encode())


def _exchange(path: Path, raw: bytes, handler=None, *, max_body: int | None = None,
              wait_close: bool = True) -> bytes:
    """Send `raw` on one connection; everything the server writes until it closes (or
    goes quiet for half a second)."""
    async def default(req: Request) -> Response:
        return _echo(req)

    async def main() -> bytes:
        kw = {"max_body": max_body} if max_body is not None else {}
        server = HttpServer(handler or default, **kw)
        await server.start_unix(path)

        def talk() -> bytes:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(0.5)
            s.connect(str(path))
            s.sendall(raw)
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except TimeoutError:
                pass
            s.close()
            return got

        got = await asyncio.to_thread(talk)
        await server.aclose()
        return got

    return asyncio.run(main())


def test_pipelined_requests_are_answered_in_order(tmp_path: Path):
    raw = (b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
           b"GET /b?q=1 HTTP/1.1\r\nhost: x\r\n\r\n")
    got = _exchange(tmp_path / "s.sock", raw)
    assert got.index(b"POST /a 3") < got.index(b"GET /b?q=1 0")
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 2


def test_malformed_request_is_400_and_closed(tmp_path: Path):
    got = _exchange(tmp_path / "s.sock", b"GET /x HTTP/1.1\r\nbad header line\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 ") and b"connection: close" in got.lower()


def test_upgrade_requests_get_no_protocol_switch(tmp_path: Path):
    got = _exchange(tmp_path / "s.sock", b"GET /x HTTP/1.1\r\nhost: x\r\nconnection: upgrade"
                    b"\r\nupgrade: h2c\r\n\r\nGET /y HTTP/1.1\r\nhost: x\r\n\r\n")
    # answered as a plain request, then the connection ends: nothing after it is read
    assert got.startswith(b"HTTP/1.1 200 ") and b"connection: close" in got
    assert got.count(b"HTTP/1.1") == 1 and b"GET /y" not in got


def test_oversized_head_is_431(tmp_path: Path):
    raw = b"GET /x HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 70000 + b"\r\n\r\n"
    got = _exchange(tmp_path / "s.sock", raw)
    assert got.startswith(b"HTTP/1.1 431 ")


def test_oversized_body_is_413(tmp_path: Path):
    raw = b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"y" * 5000
    got = _exchange(tmp_path / "s.sock", raw, max_body=1000)
    assert got.startswith(b"HTTP/1.1 413 ")


def test_expect_100_continue_is_answered_before_the_body(tmp_path: Path):
    async def handler(req: Request) -> Response:
        return Response(200, [], req.body)

    async def main() -> None:
        server = HttpServer(handler)
        await server.start_unix(tmp_path / "s.sock")

        def talk() -> tuple[bytes, bytes]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(str(tmp_path / "s.sock"))
            s.sendall(b"POST /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                      b"content-length: 4\r\n\r\n")
            interim = s.recv(65536)
            s.sendall(b"body")
            final = s.recv(65536)
            s.close()
            return interim, final

        interim, final = await asyncio.to_thread(talk)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert final.startswith(b"HTTP/1.1 200 ") and final.endswith(b"\r\n\r\nbody")
        await server.aclose()

    asyncio.run(main())


def test_http10_stream_is_sent_unchunked_then_closed(tmp_path: Path):
    async def handler(req: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"one "
            yield b"two"

        return Response(200, [], body())

    got = _exchange(tmp_path / "s.sock", b"GET /x HTTP/1.0\r\n\r\n", handler)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"one two"


def test_head_gets_no_body(tmp_path: Path):
    got = _exchange(tmp_path / "s.sock", b"HEAD /x HTTP/1.1\r\nhost: x\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: " in head and body == b""


def test_a_header_that_would_split_the_response_is_never_written(tmp_path: Path):
    finalised: list[BaseException | None] = []

    async def handler(req: Request) -> Response:
        async def final(error: BaseException | None) -> None:
            finalised.append(error)

        return Response(200, [("x-evil", "a\r\nset-cookie: stolen=1")], b"hi", final)

    got = _exchange(tmp_path / "s.sock", b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n", handler)
    assert b"set-cookie" not in got.lower()
    assert len(finalised) == 1 and isinstance(finalised[0], ValueError)


def test_a_head_that_never_ends_is_cut_off(tmp_path: Path):
    raw = b"GET /x HTTP/1.1\r\nhost: x\r\nx-endless: " + b"a" * 200_000
    got = _exchange(tmp_path / "s.sock", raw)
    assert got.startswith(b"HTTP/1.1 431 ")


def test_upstream_stream_read_times_out_and_then_reads_on():
    import httpcore

    from runner.gateway.asyncio_backend import AsyncioStream
    from runner.gateway.stream_protocol import StreamProtocol

    async def main() -> None:
        a, b = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_connection(StreamProtocol, sock=a)
        stream = AsyncioStream(transport, proto)
        t0 = time.monotonic()
        try:
            await stream.read(1024, timeout=0.2)
        except httpcore.ReadTimeout:
            pass
        else:
            raise AssertionError("no timeout")
        assert 0.15 < time.monotonic() - t0 < 2
        await stream.write(b"ping", timeout=1)  # held until the next read
        b.sendall(b"pong")
        assert await stream.read(1024, timeout=1) == b"pong"
        assert b.recv(16) == b"ping"  # the held write left before the read waited
        await asyncio.sleep(0.3)  # no timer left armed to fire on a finished read
        b.close()
        assert await stream.read(1024, timeout=1) == b""  # the peer's end
        await stream.aclose()

    asyncio.run(main())


def test_endless_trailers_are_cut_off_and_never_forwarded(tmp_path: Path):
    seen: list[list[tuple[str, str]]] = []

    async def handler(req: Request) -> Response:
        seen.append(req.headers)
        return Response(200, [], b"ok")

    # A trailer line that never ends: llhttp would hold it all, so raw bytes are counted.
    raw = (b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
           b"0\r\nx-trailer: " + b"a" * 300_000)
    got = _exchange(tmp_path / "s.sock", raw, handler)
    assert got.startswith(b"HTTP/1.1 431 ") and seen == []
    # Ordinary trailers end the request; they are not added to its headers.
    raw = (b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nx-api-key: smuggled\r\n\r\n")
    got = _exchange(tmp_path / "t.sock", raw, handler)
    assert got.startswith(b"HTTP/1.1 200 ")
    assert seen and all(k != "x-api-key" for k, _ in seen[0])


def test_a_declared_body_over_the_cap_is_refused_before_it_is_sent(tmp_path: Path):
    raw = (b"POST /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
           b"content-length: 999999999\r\n\r\n")
    got = _exchange(tmp_path / "s.sock", raw)
    assert got.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in got


def test_no_100_continue_overtakes_an_earlier_answer(tmp_path: Path):
    async def handler(req: Request) -> Response:
        await asyncio.sleep(0.2)
        return Response(200, [], req.target.encode())

    raw = (b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n"
           b"POST /second HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
           b"content-length: 2\r\n\r\nhi")
    got = _exchange(tmp_path / "s.sock", raw, handler)
    assert got.index(b"/first") < got.index(b"/second")
    assert b"100 Continue" not in got[: got.index(b"/first")]


def test_a_client_that_half_closes_still_gets_its_answer(tmp_path: Path):
    async def handler(req: Request) -> Response:
        await asyncio.sleep(0.2)
        return Response(200, [], b"late answer")

    async def main() -> bytes:
        server = HttpServer(handler)
        await server.start_unix(tmp_path / "s.sock")

        def talk() -> bytes:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(str(tmp_path / "s.sock"))
            s.sendall(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            s.close()
            return got

        got = await asyncio.to_thread(talk)
        await server.aclose()
        return got

    assert asyncio.run(main()).endswith(b"late answer")


def test_connections_beyond_the_cap_are_closed(tmp_path: Path):
    from runner.gateway import http as http_mod

    async def main() -> None:
        server = HttpServer(lambda req: _answer())  # type: ignore[arg-type, return-value]
        await server.start_unix(tmp_path / "s.sock")
        def connect_all() -> list[socket.socket]:  # off the loop, which must accept them
            out = []
            for _ in range(http_mod.MAX_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(tmp_path / "s.sock"))
                out.append(s)
            return out

        held = await asyncio.to_thread(connect_all)
        await asyncio.sleep(0.3)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(2)
        extra.connect(str(tmp_path / "s.sock"))
        await asyncio.sleep(0.3)
        try:
            extra.sendall(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = await asyncio.to_thread(extra.recv, 100)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        assert answer == b""  # closed, unanswered
        # ...while the ones within the cap are served
        held[0].sendall(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.to_thread(held[0].recv, 100)).startswith(b"HTTP/1.1 200 ")
        extra.close()
        for s in held:
            s.close()
        await server.aclose()

    asyncio.run(main())


async def _answer() -> Response:
    return Response(200, [], b"ok")


def test_a_connection_idle_between_requests_is_closed(tmp_path: Path, monkeypatch):
    from runner.gateway import http as http_mod

    monkeypatch.setattr(http_mod, "IDLE_TIMEOUT", 0.3)
    monkeypatch.setattr(http_mod, "SWEEP_EVERY", 0.1)

    async def main() -> None:
        server = HttpServer(lambda req: _answer())  # type: ignore[arg-type, return-value]
        await server.start_unix(tmp_path / "s.sock")

        def talk() -> tuple[bytes, bytes, float]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(str(tmp_path / "s.sock"))
            s.sendall(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
            first = s.recv(65536)
            t0 = time.monotonic()
            end = s.recv(65536)  # nothing more is sent: the server ends the connection
            s.close()
            return first, end, time.monotonic() - t0

        first, end, waited = await asyncio.to_thread(talk)
        assert first.startswith(b"HTTP/1.1 200 ") and end == b""
        assert 0.2 < waited < 3
        await server.aclose()

    asyncio.run(main())
