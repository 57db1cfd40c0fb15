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
