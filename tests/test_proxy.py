"""The egress proxy, host side: a client on the unix socket, canaries on 127.0.0.1.

NETWORK RULE: nothing here sends a packet off this machine. Names are resolved by an
injected resolver (or by /etc/hosts for `localhost`), and every connection the proxy
makes goes through `Guard`, which connects only to 127.0.0.0/8 and refuses anything else
without touching the network, so even a proxy bug cannot reach a real address.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from runner.events.log import Event, EventSink, Source
from runner.gateway.egress_addr import parse_ip_literal, refusal_reason
from runner.gateway.egress_rules import match_rule, parse_rules
from runner.gateway.egress_tls import ClientHello, Peek, peek_client_hello
from runner.gateway.proxy import (
    EgressProxy,
    IPAddress,
    ProxyLimits,
    Streams,
    agent_env,
    connect_address,
)
from runner.policy.models import NetworkPolicy

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def asynctest(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 20))

    return wrapper


class Sink(EventSink):
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, type: str, source: Source, **data: Any) -> Event:
        event = Event(len(self.events) + 1, 0.0, "test", type, source, "", data)
        self.events.append(event)
        return event

    def of(self, type: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == type]

    async def wait(self, type: str, count: int = 1) -> list[dict[str, Any]]:
        for _ in range(200):
            if len(self.of(type)) >= count:
                return self.of(type)
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {type} event; got {[e.type for e in self.events]}")


class Guard:
    """The proxy's connector in tests: records every attempt, connects only to loopback."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, address: IPAddress, port: int) -> Streams:
        self.calls.append((str(address), port))
        if address not in LOOPBACK:
            raise ConnectionRefusedError(f"test guard: {address} is off-machine, not dialled")
        return await connect_address(address, port)


class FakeResolver:
    """Answers from a table; each host may get a list of answers, one per lookup."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append(host)
        answer = self.table.get(host, self.table.get("*"))
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "unknown in test")
        if answer and isinstance(answer[0], list):  # one answer per successive lookup
            return list(answer[min(len(self.calls), len(answer)) - 1])
        return list(answer)


class Canary:
    """A TCP listener on 127.0.0.1: echoes, or answers one HTTP request."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.connections = 0
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Canary:
        self._server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _on(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.mode == "http":
                self.received += await r.readuntil(b"\r\n\r\n")
                await asyncio.sleep(0.2)  # let anything pipelined behind arrive too
                with contextlib.suppress(TimeoutError, ConnectionError):
                    self.received += await asyncio.wait_for(r.read(4096), 0.05)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await w.drain()
            else:
                while data := await r.read(65536):
                    self.received += data
                    w.write(data)
                    await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="airlock-proxy-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_proxy(sock_dir: Path, allow: list[str], allow_private: list[str] | None = None, *,
               resolver: Any = None, limits: ProxyLimits | None = None
               ) -> tuple[EgressProxy, Sink, Guard]:
    sink, guard = Sink(), Guard()
    policy = NetworkPolicy(mode="proxy", allow=allow, allow_private=allow_private or [])
    proxy = EgressProxy(policy, sock_dir / "proxy.sock", sink, resolver=resolver,
                        connector=guard, limits=limits)
    return proxy, sink, guard


async def send(proxy: EgressProxy, request: bytes) -> tuple[int, bytes, Streams]:
    """Send raw bytes to the proxy; the status and head of its answer, and the streams."""
    r, w = await asyncio.open_unix_connection(str(proxy.socket_path))
    w.write(request)
    await w.drain()
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    return int(head.split()[1]), head, (r, w)


def connect_line(target: str, host: str | None = None) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {host or target}\r\n\r\n".encode()


async def refused(proxy: EgressProxy, request: bytes, status: int = 403) -> bytes:
    got, head, (r, w) = await send(proxy, request)
    body = await asyncio.wait_for(r.read(), 5)
    w.close()
    assert got == status, head + body
    return head + body


def client_hello(server_name: str | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        ctx.check_hostname = False
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


# -- allowed ---------------------------------------------------------------------------


@asynctest
async def test_allowed_host_port_reaches_canary(sock_dir: Path) -> None:
    async with Canary() as canary:
        proxy, sink, guard = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"])
        async with proxy:
            status, _, (r, w) = await send(proxy, connect_line(f"localhost:{canary.port}"))
            assert status == 200
            w.write(b"hello")
            assert await asyncio.wait_for(r.readexactly(5), 5) == b"hello"
            w.close()
            closed = (await sink.wait("proxy.closed"))[0]
        allowed = sink.of("proxy.allowed")[0]
        assert allowed["target"] == f"localhost:{canary.port}"
        assert allowed["address"] == "127.0.0.1"
        assert allowed["rule"] == f"localhost:{canary.port}"
        assert closed["bytes_up"] == 5 and closed["bytes_down"] == 5
        assert closed["duration_s"] >= 0 and closed["tls"] is False
        assert guard.calls == [("127.0.0.1", canary.port)]
        assert canary.connections == 1


@asynctest
async def test_socket_is_world_connectable_and_removed_on_close(sock_dir: Path) -> None:
    proxy, _, _ = make_proxy(sock_dir, [])
    await proxy.start()
    mode = proxy.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o666
    await proxy.aclose()
    assert not proxy.socket_path.exists()


@asynctest
async def test_aclose_cuts_open_tunnels(sock_dir: Path) -> None:
    async with Canary() as canary:
        proxy, sink, _ = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"])
        await proxy.start()
        status, _, (r, w) = await send(proxy, connect_line(f"localhost:{canary.port}"))
        assert status == 200
        await proxy.aclose()
        assert (await sink.wait("proxy.closed"))[0]["end"] == "shutdown"
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()


@asynctest
async def test_ip_literal_listed_and_covered_connects(sock_dir: Path) -> None:
    async with Canary() as canary:
        proxy, sink, _ = make_proxy(sock_dir, [f"127.0.0.1:{canary.port}"], ["127.0.0.0/8"])
        async with proxy:
            status, _, (r, w) = await send(proxy, connect_line(f"127.0.0.1:{canary.port}"))
            assert status == 200
            w.write(b"x")
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
            w.close()
            # Another spelling of the same address is still refused.
            await refused(proxy, connect_line(f"2130706433:{canary.port}"))
        assert sink.of("proxy.refused")[0]["reason"] == "ip-literal"


@asynctest
async def test_wildcard_matches_subdomains_and_resolves_once(sock_dir: Path) -> None:
    # The second lookup would point at the metadata service (a rebinding attempt);
    # the proxy must connect to what it checked and never look again.
    resolver = FakeResolver({"*": [["127.0.0.1"], ["169.254.169.254"]]})
    async with Canary() as canary:
        proxy, sink, guard = make_proxy(sock_dir, [f"*.example.test:{canary.port}"],
                                        ["127.0.0.0/8"], resolver=resolver)
        async with proxy:
            target = f"a.b.example.test:{canary.port}"
            status, _, (r, w) = await send(proxy, connect_line(target))
            assert status == 200
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
            w.close()
            await sink.wait("proxy.closed")
        assert resolver.calls == ["a.b.example.test"]
        assert guard.calls == [("127.0.0.1", canary.port)]


@asynctest
async def test_mixed_answer_connects_only_to_an_allowed_address(sock_dir: Path) -> None:
    resolver = FakeResolver({"mixed.example.test": ["10.0.0.1", "169.254.169.254", "127.0.0.1"]})
    async with Canary() as canary:
        proxy, sink, guard = make_proxy(sock_dir, [f"mixed.example.test:{canary.port}"],
                                        ["127.0.0.0/8"], resolver=resolver)
        async with proxy:
            status, _, (_, w) = await send(proxy, connect_line(f"mixed.example.test:{canary.port}"))
            assert status == 200
            w.close()
            await sink.wait("proxy.closed")
        assert guard.calls == [("127.0.0.1", canary.port)]
        skipped = {s["address"]: s["reason"] for s in sink.of("proxy.allowed")[0]["skipped"]}
        assert skipped == {"10.0.0.1": "private", "169.254.169.254": "metadata"}


# -- refused before any connection ------------------------------------------------------


def assert_refused(sink: Sink, guard: Guard, reason: str) -> dict[str, Any]:
    events = sink.of("proxy.refused")
    assert len(events) == 1, sink.events
    assert events[0]["reason"] == reason, events[0]
    assert events[0]["status"] == 403
    assert guard.calls == []  # the proxy refused before dialling anything
    assert not sink.of("proxy.allowed")
    return events[0]


@asynctest
async def test_disallowed_name_is_refused_without_a_lookup(sock_dir: Path) -> None:
    resolver = FakeResolver({"*": ["127.0.0.1"]})
    proxy, sink, guard = make_proxy(sock_dir, ["pypi.org:443"], resolver=resolver)
    async with proxy:
        answer = await refused(proxy, connect_line("evil.example:443"))
    assert b"X-Airlock-Reason: host-not-allowed" in answer
    event = assert_refused(sink, guard, "host-not-allowed")
    assert event["target"] == "evil.example:443"
    assert resolver.calls == []  # a refused name never becomes a DNS query


@pytest.mark.parametrize("target", [
    "127.0.0.1:{port}", "2130706433:{port}", "0x7f.1:{port}", "0x7F000001:{port}",
    "0177.0.0.1:{port}", "127.1:{port}", "127.0.0.1.:{port}", "[::1]:{port}",
    "[::ffff:127.0.0.1]:{port}", "[::ffff:7f00:1]:{port}", "::1", "1.2.3.4.5:443",
    "017700000001:{port}", "8.8.8.8:443", "[2001:4860:4860::8888]:443",
])
@asynctest
async def test_ip_literals_are_refused(sock_dir: Path, target: str) -> None:
    resolver = FakeResolver({})
    async with Canary() as canary:
        # 8.8.8.8:443 is listed, but a literal also needs allow_private to cover it.
        proxy, sink, guard = make_proxy(
            sock_dir, [f"localhost:{canary.port}", "8.8.8.8:443"], ["127.0.0.0/8"],
            resolver=resolver)
        async with proxy:
            line = target.format(port=canary.port)
            await refused(proxy, f"CONNECT {line} HTTP/1.1\r\n\r\n".encode())
        assert_refused(sink, guard, "ip-literal")
        assert resolver.calls == [] and canary.connections == 0


@asynctest
async def test_name_resolving_to_loopback_needs_allow_private(sock_dir: Path) -> None:
    async with Canary() as canary:
        # The real resolver: `localhost` comes from /etc/hosts, no packet leaves.
        proxy, sink, guard = make_proxy(sock_dir, [f"localhost:{canary.port}"])
        async with proxy:
            await refused(proxy, connect_line(f"localhost:{canary.port}"))
        event = assert_refused(sink, guard, "address-forbidden")
        assert {s["reason"] for s in event["skipped"]} == {"loopback"}
        assert "127.0.0.1" in event["addresses"]
        assert canary.connections == 0


@asynctest
async def test_disallowed_port_is_refused(sock_dir: Path) -> None:
    resolver = FakeResolver({"*": ["127.0.0.1"]})
    async with Canary() as canary:
        proxy, sink, guard = make_proxy(sock_dir, [f"localhost:{canary.port}"],
                                        ["127.0.0.0/8"], resolver=resolver)
        async with proxy:
            await refused(proxy, connect_line(f"localhost:{canary.port + 1}"))
            await refused(proxy, connect_line("localhost"))  # no port means 443
        assert [e["reason"] for e in sink.of("proxy.refused")] == ["port-not-allowed"] * 2
        assert guard.calls == [] and resolver.calls == [] and canary.connections == 0


@pytest.mark.parametrize("host", ["example.test", "badexample.test", "example.test.evil",
                                  "xexample.test", "example.testx"])
@asynctest
async def test_wildcard_does_not_match_apex_or_lookalikes(sock_dir: Path, host: str) -> None:
    resolver = FakeResolver({"*": ["127.0.0.1"]})
    proxy, sink, guard = make_proxy(sock_dir, ["*.example.test:443"], ["127.0.0.0/8"],
                                    resolver=resolver)
    async with proxy:
        await refused(proxy, connect_line(f"{host}:443"))
    assert_refused(sink, guard, "host-not-allowed")
    assert resolver.calls == []


@pytest.mark.parametrize("address", [
    "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:169.254.169.254",
    "169.254.170.2", "168.63.129.16",
])
@pytest.mark.parametrize("allow_private", [[], ["169.254.0.0/16", "100.64.0.0/10", "fd00::/8",
                                                "168.63.0.0/16"]])
@asynctest
async def test_metadata_addresses_are_refused_before_connecting(
        sock_dir: Path, address: str, allow_private: list[str]) -> None:
    resolver = FakeResolver({"meta.example.test": [address]})
    proxy, sink, guard = make_proxy(sock_dir, ["meta.example.test:80"], allow_private,
                                    resolver=resolver)
    async with proxy:
        await refused(proxy, connect_line("meta.example.test:80"))
    event = assert_refused(sink, guard, "address-forbidden")
    assert [s["reason"] for s in event["skipped"]] == ["metadata"]


@asynctest
async def test_metadata_opens_only_when_listed_exactly(sock_dir: Path) -> None:
    # The guard refuses the dial itself (no packet); what matters is that the proxy
    # tried, and only because the policy named the /32.
    resolver = FakeResolver({"meta.example.test": ["169.254.169.254"]})
    proxy, sink, guard = make_proxy(sock_dir, ["meta.example.test:80"],
                                    ["169.254.169.254/32"], resolver=resolver)
    async with proxy:
        await refused(proxy, connect_line("meta.example.test:80"), status=502)
    assert guard.calls == [("169.254.169.254", 80)]
    assert sink.of("proxy.failed")[0]["reason"] == "connect-failed"


@pytest.mark.parametrize("address", [
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.1.1", "127.0.0.2",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.1", "198.18.0.1",
    "::1", "::", "fe80::1", "fc00::1", "fec0::1", "ff02::1", "::ffff:10.0.0.1",
    "::127.0.0.1", "2002:7f00:1::", "2002:a00:1::", "64:ff9b::a00:1", "2001:db8::1",
])
@asynctest
async def test_non_public_resolutions_are_refused(sock_dir: Path, address: str) -> None:
    resolver = FakeResolver({"rebind.example.test": [address]})
    proxy, sink, guard = make_proxy(sock_dir, ["rebind.example.test:443"], resolver=resolver)
    async with proxy:
        await refused(proxy, connect_line("rebind.example.test:443"))
    assert_refused(sink, guard, "address-forbidden")


@asynctest
async def test_connect_host_header_must_match(sock_dir: Path) -> None:
    resolver = FakeResolver({"*": ["127.0.0.1"]})
    proxy, sink, guard = make_proxy(sock_dir, ["a.example.test:443"], ["127.0.0.0/8"],
                                    resolver=resolver)
    async with proxy:
        await refused(proxy, connect_line("a.example.test:443", host="b.example.test:443"))
    assert_refused(sink, guard, "host-mismatch")


# -- TLS SNI ----------------------------------------------------------------------------


async def tunnel_with_hello(sock_dir: Path, sni: str | None, *, split: bool = False
                            ) -> tuple[Sink, Canary, bytes]:
    hello = client_hello(sni)
    resolver = FakeResolver({"*": ["127.0.0.1"]})
    async with Canary() as canary:
        proxy, sink, _ = make_proxy(sock_dir, [f"pkg.example.test:{canary.port}"],
                                    ["127.0.0.0/8"], resolver=resolver)
        async with proxy:
            status, _, (r, w) = await send(proxy, connect_line(f"pkg.example.test:{canary.port}"))
            assert status == 200
            if split:  # a ClientHello arriving in pieces is reassembled, not misjudged
                w.write(hello[:7])
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(hello[7:])
            else:
                w.write(hello)
            echoed = await asyncio.wait_for(r.read(len(hello)), 5)
            w.close()
            await sink.wait("proxy.closed")
        return sink, canary, echoed


@pytest.mark.parametrize("split", [False, True])
@asynctest
async def test_tls_with_matching_sni_passes(sock_dir: Path, split: bool) -> None:
    sink, canary, echoed = await tunnel_with_hello(sock_dir, "pkg.example.test", split=split)
    # The canary echoes, so the whole ClientHello went upstream unchanged.
    assert len(echoed) > 100 and bytes(canary.received) == echoed
    closed = sink.of("proxy.closed")[0]
    assert closed["tls"] is True and closed["sni"] == "pkg.example.test"
    assert not sink.of("proxy.refused")


@pytest.mark.parametrize("sni,reason", [("evil.example", "sni-mismatch"),
                                        ("example.test", "sni-mismatch"),
                                        (None, "sni-missing")])
@asynctest
async def test_tls_with_other_or_no_sni_is_cut(sock_dir: Path, sni: str | None,
                                                reason: str) -> None:
    sink, canary, echoed = await tunnel_with_hello(sock_dir, sni)
    assert echoed == b"" and bytes(canary.received) == b""  # no byte went upstream
    event = sink.of("proxy.refused")[0]
    assert event["reason"] == reason and event["sni"] == sni
    assert sink.of("proxy.closed")[0]["end"] == "refused"


def test_client_hello_parser() -> None:
    hello = client_hello("Pkg.Example.Test")
    parsed = peek_client_hello(hello)
    assert isinstance(parsed, ClientHello) and parsed.sni == "pkg.example.test"
    assert peek_client_hello(hello[:40]) is Peek.NEED_MORE
    assert peek_client_hello(b"SSH-2.0-OpenSSH_9.6\r\n") is Peek.NOT_TLS
    assert peek_client_hello(b"GET / HTTP/1.1\r\n") is Peek.NOT_TLS
    assert peek_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is Peek.MALFORMED
    # Truncate the handshake length so the extensions run past the end: malformed.
    broken = hello[:5] + b"\x01\x00\x00\x30" + hello[9:5 + 4 + 0x30]
    broken = broken[:3] + len(broken[5:]).to_bytes(2, "big") + broken[5:]
    assert peek_client_hello(broken) is Peek.MALFORMED


# -- plain HTTP -------------------------------------------------------------------------


def http_request(port: int, host: str | None = None, extra: str = "") -> bytes:
    return (f"GET http://localhost:{port}/simple/pkg/?token=s3cret HTTP/1.1\r\n"
            f"Host: {host or f'localhost:{port}'}\r\nProxy-Authorization: Basic eA==\r\n"
            f"Connection: keep-alive\r\n{extra}\r\n").encode()


@asynctest
async def test_plain_http_is_forwarded_origin_form(sock_dir: Path) -> None:
    async with Canary("http") as canary:
        proxy, sink, _ = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"])
        async with proxy:
            second = b"GET http://other.example/ HTTP/1.1\r\nHost: other.example\r\n\r\n"
            status, _, (r, w) = await send(proxy, http_request(canary.port) + second)
            assert status == 200
            assert await asyncio.wait_for(r.read(), 5) == b"ok"
            w.close()
            await sink.wait("proxy.closed")
        got = bytes(canary.received)
        assert got.startswith(b"GET /simple/pkg/?token=s3cret HTTP/1.1\r\n")
        assert b"Connection: close\r\n" in got and b"keep-alive" not in got
        assert b"Proxy-Authorization" not in got
        assert b"other.example" not in got  # the pipelined request never went upstream
        assert sink.of("proxy.allowed")[0]["path"] == "/simple/pkg/"  # no query in the log


@pytest.mark.parametrize("host,reason,status", [
    ("evil.example", "host-mismatch", 403), ("localhost:1", "host-mismatch", 403),
])
@asynctest
async def test_plain_http_host_must_match(sock_dir: Path, host: str, reason: str,
                                          status: int) -> None:
    async with Canary("http") as canary:
        proxy, sink, guard = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"])
        async with proxy:
            await refused(proxy, http_request(canary.port, host=host), status=status)
        assert_refused(sink, guard, reason)
        assert canary.connections == 0


@pytest.mark.parametrize("request_bytes,status,reason", [
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, "not-a-proxy-request"),
    (b"GET https://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "https-needs-connect"),
    (b"GET http://localhost:{port}/ HTTP/1.1\r\nHost: localhost:{port}\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 411, "transfer-encoding"),
    (b"GET http://localhost:{port}/ HTTP/1.1\r\n\r\n", 400, "host-missing"),
    (b"CONNECT localhost:{port} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "host-duplicate"),
    (b"CONNECT localhost:{port} HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400, "bad-header"),
    (b"CONNECT localhost:{port} HTTP/1.1\nHost: x\r\n\r\n", 400, "bad-head"),
    (b"CONNECT user@localhost:{port} HTTP/1.1\r\n\r\n", 400, "bad-target"),
    (b"CONNECT localhost:99999 HTTP/1.1\r\n\r\n", 400, "bad-target"),
    (b"CONNECT loc%61lhost:{port} HTTP/1.1\r\n\r\n", 400, "bad-target"),
])
@asynctest
async def test_malformed_requests_are_refused(sock_dir: Path, request_bytes: bytes,
                                              status: int, reason: str) -> None:
    async with Canary("http") as canary:
        proxy, sink, guard = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"])
        async with proxy:
            req = request_bytes.replace(b"{port}", str(canary.port).encode())
            await refused(proxy, req, status=status)
        event = sink.of("proxy.refused")[0]
        assert event["reason"] == reason and event["status"] == status
        assert guard.calls == [] and canary.connections == 0


# -- limits -----------------------------------------------------------------------------


@asynctest
async def test_oversized_head_is_refused(sock_dir: Path) -> None:
    proxy, sink, guard = make_proxy(sock_dir, [], limits=ProxyLimits(max_head_bytes=1024))
    async with proxy:
        big = b"CONNECT a.example:443 HTTP/1.1\r\nX-Pad: " + b"a" * 4096 + b"\r\n\r\n"
        await refused(proxy, big, status=431)
    assert sink.of("proxy.refused")[0]["reason"] == "head-too-large"
    assert guard.calls == []


@asynctest
async def test_slow_connect_line_times_out(sock_dir: Path) -> None:
    proxy, sink, _ = make_proxy(sock_dir, [], limits=ProxyLimits(head_timeout=0.2))
    async with proxy:
        r, w = await asyncio.open_unix_connection(str(proxy.socket_path))
        w.write(b"CONNECT a.example:443 HTTP/1.1\r\n")  # and never the blank line
        answer = await asyncio.wait_for(r.read(), 5)
        w.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert sink.of("proxy.refused")[0]["reason"] == "head-timeout"


@asynctest
async def test_concurrent_tunnels_are_capped(sock_dir: Path) -> None:
    async with Canary() as canary:
        proxy, sink, _ = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"],
                                    limits=ProxyLimits(max_tunnels=1))
        async with proxy:
            status, _, (_, w) = await send(proxy, connect_line(f"localhost:{canary.port}"))
            assert status == 200
            await refused(proxy, connect_line(f"localhost:{canary.port}"), status=503)
            w.close()
        assert sink.of("proxy.refused")[0]["reason"] == "too-many-tunnels"


@asynctest
async def test_idle_tunnel_is_closed(sock_dir: Path) -> None:
    async with Canary() as canary:
        proxy, sink, _ = make_proxy(sock_dir, [f"localhost:{canary.port}"], ["127.0.0.0/8"],
                                    limits=ProxyLimits(idle_timeout=0.2))
        async with proxy:
            status, _, (r, w) = await send(proxy, connect_line(f"localhost:{canary.port}"))
            assert status == 200
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        assert sink.of("proxy.closed")[0]["end"] == "idle-timeout"


# -- configuration and helpers ----------------------------------------------------------


def test_agent_env_keeps_loopback_direct() -> None:
    env = agent_env("http://127.0.0.1:3128")
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        assert env[name] == "http://127.0.0.1:3128"
    for name in ("NO_PROXY", "no_proxy"):
        assert {"127.0.0.1", "localhost"} <= set(env[name].split(","))
    with pytest.raises(ValueError):
        agent_env("socks5://127.0.0.1:1080")


@pytest.mark.parametrize("network", [
    {"mode": "gateway"},
    {"mode": "proxy", "allow_private": ["not-a-cidr"]},
    {"mode": "proxy", "allow": ["127.1:80"]},  # a listed address must be canonical
])
def test_bad_configuration_fails_loudly(sock_dir: Path, network: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EgressProxy(NetworkPolicy(**network), sock_dir / "p.sock", Sink())


@pytest.mark.parametrize("text", ["127.0.0.1", "2130706433", "0x7f.1", "0177.0.0.1", "127.1",
                                  "0x7f.0.0.1", "127.0.1", "[::ffff:127.0.0.1]", "127.0.0.1."])
def test_ip_literal_encodings_decode(text: str) -> None:
    literal = parse_ip_literal(text)
    assert literal is not None and refusal_reason(literal, []) == "loopback"


def test_allow_rules() -> None:
    rules = parse_rules(["pypi.org", "*.pythonhosted.org:443", "Example.TEST.:8443"])
    assert match_rule(rules, "pypi.org", 443)[0] is not None  # no port means 443
    assert match_rule(rules, "pypi.org", 80)[1] == "port-not-allowed"
    assert match_rule(rules, "files.pythonhosted.org", 443)[0] is not None
    assert match_rule(rules, "pythonhosted.org", 443)[1] == "host-not-allowed"
    assert match_rule(rules, "example.test", 8443)[0] is not None


def test_public_address_passes_without_allow_private() -> None:
    # Judged only, never dialled.
    assert refusal_reason(ipaddress.ip_address("93.184.216.34"), []) is None
    assert refusal_reason(ipaddress.ip_address("2606:4700::1"), []) is None
    assert refusal_reason(ipaddress.ip_address("64:ff9b::5db8:d822"), []) is None  # NAT64

