"""The gateway's upstream client (`runner.gateway.upstream`) against raw HTTP servers.

What the gateway relies on: keep-alive reuse and never reusing a connection the server
closed; each chunk handed on as it arrives; bodies decoded as httpx would; TLS
verified (roots, host name); httpx's exception classes for every failure.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from runner.gateway.upstream import UpstreamPool

TIMEOUT = httpx.Timeout(connect=5.0, read=5.0, write=5.0, pool=1.0)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


def _response(body: bytes, *, headers: dict[str, str] | None = None, close: bool = False) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"content-length: {len(body)}", "content-type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Server:
    def __init__(self, handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl = ssl_ctx
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    def url(self, path: str = "/v1/messages", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}{path}"


async def _body(resp) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join([chunk async for chunk in resp.aiter_bytes()])


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_keep_alive_reuses_one_connection_and_sends_the_request_whole():
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _read_request(reader))
            writer.write(_response(b'{"ok":true}'))
            await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            pool = UpstreamPool(timeout=TIMEOUT)
            for _ in range(3):
                resp = await pool.request("POST", srv.url(), [("content-type", "application/json")],
                                          b'{"model":"m"}')
                assert resp.status_code == 200
                assert await _body(resp) == b'{"ok":true}'
                await resp.aclose()
            await pool.aclose()
            assert srv.connections == 1
            assert all(req.endswith(b'{"model":"m"}') for req in seen)
            assert b"host: 127.0.0.1:" in seen[0].lower() and b"content-length: 13" in seen[0].lower()

    run(main())


def test_a_connection_the_server_closed_is_not_reused():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_response(b"one"))
        await writer.drain()  # and close: the server does not keep connections alive

    async def main() -> None:
        async with Server(handler) as srv:
            pool = UpstreamPool(timeout=TIMEOUT)
            for expected in (b"one", b"one"):
                resp = await pool.request("GET", srv.url("/v1/models"), [])
                assert await _body(resp) == expected
                await asyncio.sleep(0.05)  # the close reaches us while the connection idles
            assert srv.connections == 2
            await pool.aclose()

    run(main())


def test_chunks_are_handed_on_as_they_arrive():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                     b"content-type: text/event-stream\r\n\r\n")
        for part in (b"event: a\n\n", b"event: b\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.5)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            pool = UpstreamPool(timeout=TIMEOUT)
            t0 = time.monotonic()
            resp = await pool.request("POST", srv.url(), [], b"{}")
            arrivals = []
            async for chunk in resp.aiter_bytes():
                arrivals.append((chunk, time.monotonic() - t0))
            assert [c for c, _ in arrivals] == [b"event: a\n\n", b"event: b\n\n"]
            assert arrivals[0][1] < 0.4  # the first event did not wait for the second
            await pool.aclose()

    run(main())


def test_bodies_are_decoded_as_httpx_decodes_them():
    data = b'{"usage":{"input_tokens":3}}' * 50

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_response(gzip.compress(data), headers={"content-encoding": "gzip"}))
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            pool = UpstreamPool(timeout=TIMEOUT)
            resp = await pool.request("POST", srv.url(), [], b"{}")
            assert await _body(resp) == data
            await pool.aclose()

    run(main())


def test_a_body_cut_short_is_an_error_and_the_connection_is_dropped():
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as srv:
            pool = UpstreamPool(timeout=TIMEOUT)
            resp = await pool.request("POST", srv.url(), [], b"{}")
            with pytest.raises(httpx.RemoteProtocolError):
                await _body(resp)
            assert not any(pool._idle.values())
            await pool.aclose()

    run(main())


def test_failures_raise_httpx_errors():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(10)

    async def main() -> None:
        async with Server(silent) as srv:
            pool = UpstreamPool(timeout=httpx.Timeout(5.0, read=0.3))
            with pytest.raises(httpx.ReadTimeout):
                await pool.request("POST", srv.url(), [], b"{}")
            port = srv.port
        pool = UpstreamPool(timeout=TIMEOUT)
        with pytest.raises(httpx.ConnectError):
            await pool.request("GET", f"http://127.0.0.1:{port}/", [])
        with pytest.raises(httpx.UnsupportedProtocol):
            await pool.request("GET", "ftp://example.invalid/", [])
        with pytest.raises(httpx.LocalProtocolError):  # no header smuggling upstream
            await pool.request("GET", f"http://127.0.0.1:{port}/", [("x-key", "a\r\nx-evil: 1")])

    run(main())


def test_the_pool_limit_holds_and_times_out():
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(0.5)
        writer.write(_response(b"x"))
        await writer.drain()

    async def main() -> None:
        async with Server(slow) as srv:
            pool = UpstreamPool(timeout=httpx.Timeout(5.0, pool=0.1), max_connections=1)
            first = asyncio.ensure_future(pool.request("POST", srv.url(), [], b"{}"))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await pool.request("POST", srv.url(), [], b"{}")
            resp = await first
            assert await _body(resp) == b"x"
            await pool.aclose()

    run(main())


# -- TLS ----------------------------------------------------------------------------------


def _tls(tmp_path: Path, names: list[str]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a certificate for `names`, client context trusting its CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "airlock test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(
        cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def _ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await _read_request(reader)
        writer.write(_response(b"secure"))
        await writer.drain()


def test_tls_with_a_trusted_certificate(tmp_path: Path):
    server_ctx, client_ctx = _tls(tmp_path, ["127.0.0.1"])

    async def main() -> None:
        async with Server(_ok, server_ctx) as srv:
            pool = UpstreamPool(timeout=TIMEOUT, ssl_context=client_ctx)
            resp = await pool.request("POST", srv.url(), [], b"{}")
            assert await _body(resp) == b"secure"
            await pool.aclose()

    run(main())


def test_tls_refuses_unknown_roots_and_wrong_names(tmp_path: Path):
    server_ctx, client_ctx = _tls(tmp_path, ["other.test"])

    async def main() -> None:
        async with Server(_ok, server_ctx) as srv:
            default = UpstreamPool(timeout=TIMEOUT)  # certifi roots: the test CA is unknown
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await default.request("POST", srv.url(), [], b"{}")
            trusting = UpstreamPool(timeout=TIMEOUT, ssl_context=client_ctx)
            with pytest.raises(httpx.ConnectError):  # a valid certificate, for another name
                await trusting.request("POST", srv.url(), [], b"{}")

    run(main())
