"""The egress proxy (network mode `proxy`): HTTP CONNECT, and plain-HTTP requests,
to the hosts the policy names, on a unix socket bound into one run's sandbox.

The sandbox has no network stack to the outside; this proxy is its only road to hosts
other than the provider, so every check happens here, on the host:

1. the target must match `network.allow` (host:port, *.domain:port) *before* any DNS
   lookup, so a refused name never even becomes a query (no DNS exfiltration);
2. the host resolves the name itself and judges every address it got: private,
   loopback, link-local, CGNAT, multicast, reserved, non-global and cloud-metadata
   addresses are refused unless `allow_private` covers them;
3. it connects to an address it judged, never re-resolving, so DNS rebinding between
   check and use cannot happen; IP literals in the target are refused unless the policy
   lists the canonical literal in `allow` *and* covers it in `allow_private`;
4. inside a CONNECT tunnel the first bytes are peeked: a TLS ClientHello must carry an
   SNI equal to the CONNECT host (see egress_tls for what that does and does not stop);
   plain-HTTP requests must carry a Host header equal to their URI's authority.

Every decision is an event with source "proxy": proxy.allowed, proxy.refused,
proxy.failed (allowed by policy but unreachable), proxy.closed (bytes and duration),
proxy.error (a bug: the connection is dropped, nothing is forwarded).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.events.log import EventSink
from runner.gateway.egress_addr import (
    IPAddress,
    looks_numeric,
    parse_cidrs,
    parse_ip_literal,
    refusal_reason,
    unwrap,
)
from runner.gateway.egress_http import (
    HeadError,
    RequestHead,
    content_length,
    error_response,
    forward_head,
    host_matches,
    parse_head,
    read_head,
    split_absolute_http,
)
from runner.gateway.egress_rules import (
    DEFAULT_PORT,
    Target,
    TargetError,
    match_rule,
    normalise_name,
    parse_authority,
    parse_rules,
)
from runner.gateway.egress_tls import ClientHello, Peek, peek_client_hello
from runner.policy.models import NetworkPolicy

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
Connector = Callable[[IPAddress, int], Awaitable[Streams]]

# Loopback stays direct: the gateway and MCP endpoints the shim exposes live there, and
# sending them through the proxy would only produce refusals.
NO_PROXY = "127.0.0.1,localhost,::1"
MAX_ADDRESSES = 32


def agent_env(proxy_url: str) -> dict[str, str]:
    """The variables that point an agent's HTTP clients at the proxy (proxy mode only).

    Both spellings: curl and Python read the lower-case ones first, Go and Node the
    upper-case ones."""
    if not proxy_url.startswith("http://"):
        raise ValueError("the proxy URL is the shim's loopback port: http://127.0.0.1:PORT")
    return {
        "HTTPS_PROXY": proxy_url,
        "HTTP_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "http_proxy": proxy_url,
        "NO_PROXY": NO_PROXY,
        "no_proxy": NO_PROXY,
    }


@dataclass(frozen=True)
class ProxyLimits:
    max_head_bytes: int = 16 * 1024
    max_header_lines: int = 100
    head_timeout: float = 10.0  # the whole request head, CONNECT line included
    resolve_timeout: float = 5.0
    connect_timeout: float = 10.0
    tls_peek_timeout: float = 10.0  # from the first ClientHello byte to the whole hello
    idle_timeout: float = 300.0  # no bytes in either direction
    max_tunnels: int = 64  # concurrent client connections; each carries one tunnel at most
    chunk: int = 64 * 1024


async def system_resolver(host: str, port: int) -> list[str]:
    """getaddrinfo in the loop's thread pool, TCP answers only."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


async def connect_address(address: IPAddress, port: int) -> Streams:
    """Connect to exactly this address. AI_NUMERICHOST guarantees no DNS happens here:
    the address is the one that was checked."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    info = socket.getaddrinfo(str(address), port, family, socket.SOCK_STREAM,
                              socket.IPPROTO_TCP, socket.AI_NUMERICHOST)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, info[0][4])
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


class Refusal(HeadError):
    """A request the proxy does not serve. `respond` is False once a tunnel is open
    (the client no longer reads HTTP); `event` is proxy.refused or proxy.failed."""

    def __init__(self, status: int, reason: str, detail: str, *,
                 event: str = "proxy.refused", respond: bool = True, **fields: Any) -> None:
        super().__init__(status, reason, detail)
        self.event = event
        self.respond = respond
        self.fields = fields


class _Idle(Exception):
    pass


@dataclass
class _Decision:
    rule: str
    addresses: list[str]  # everything the name resolved to, in resolver order
    usable: list[IPAddress]  # the checked addresses the proxy may connect to
    skipped: list[dict[str, str]]  # refused addresses with the reason


@dataclass
class _Flow:
    """Accounting for one tunnel or proxied request."""

    conn: int
    target: Target
    numeric: bool
    address: str
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    up: int = 0
    down: int = 0
    tls: bool | None = None
    sni: str | None = None
    ech: bool = False
    end: str = "eof"


def _clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


class EgressProxy:
    """One run's CONNECT proxy on a unix socket. `start()` binds and returns once
    listening; `aclose()` stops accepting, cuts open tunnels and removes the socket."""

    def __init__(self, network: NetworkPolicy, socket_path: Path, sink: EventSink, *,
                 resolver: Resolver | None = None, connector: Connector | None = None,
                 limits: ProxyLimits | None = None) -> None:
        if network.mode != "proxy":
            raise ValueError(f"the egress proxy runs only in network mode proxy ({network.mode})")
        # Parse the policy up front: a bad entry must stop the run, not open nothing
        # (or something else) later.
        self.rules = parse_rules(network.allow)
        self.allow_private = parse_cidrs(network.allow_private)
        self.socket_path = Path(socket_path)
        self.limits = limits or ProxyLimits()
        self._sink = sink
        self._resolver: Resolver = resolver or system_resolver
        self._connector: Connector = connector or connect_address
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the proxy is already started")
        self._server = await asyncio.start_unix_server(self._on_client, path=str(self.socket_path))
        # The sandbox's uid differs from the host's; the socket's directory, bound into
        # exactly one run, is what keeps other runs and users out.
        os.chmod(self.socket_path, 0o666)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self.socket_path.unlink()

    async def __aenter__(self) -> EgressProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def active(self) -> int:
        return len(self._tasks)

    def _emit(self, type: str, **data: Any) -> None:
        self._sink.emit(type, "proxy", **data)

    # -- one client connection -------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = next(self._ids)
        ctx: dict[str, Any] = {"conn": conn}
        try:
            if len(self._tasks) > self.limits.max_tunnels:
                raise Refusal(503, "too-many-tunnels",
                              f"more than {self.limits.max_tunnels} concurrent connections")
            await self._serve(ctx, reader, writer)
        except HeadError as exc:
            await self._refuse(ctx, writer, exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; a tunnel already logged proxy.closed
        except Exception as exc:  # fail closed and leave a trace
            self._emit("proxy.error", **ctx, error=f"{type(exc).__name__}: {_clip(str(exc))}")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _refuse(self, ctx: dict[str, Any], writer: asyncio.StreamWriter,
                      exc: HeadError) -> None:
        event, respond, fields = "proxy.refused", True, {}
        if isinstance(exc, Refusal):
            event, respond, fields = exc.event, exc.respond, exc.fields
        self._emit(event, **ctx, status=exc.status, reason=exc.reason, detail=exc.detail,
                   **fields)
        if respond:
            with contextlib.suppress(ConnectionError, TimeoutError):
                writer.write(error_response(exc.status, exc.reason, exc.detail))
                await asyncio.wait_for(writer.drain(), 5.0)

    async def _serve(self, ctx: dict[str, Any], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        try:
            got = await asyncio.wait_for(read_head(reader, lim.max_head_bytes), lim.head_timeout)
        except TimeoutError:
            raise Refusal(408, "head-timeout",
                          f"no complete request head within {lim.head_timeout:g}s") from None
        if got is None:
            return  # connected and left without a request: nothing was decided
        raw, rest = got
        head = parse_head(raw, lim.max_header_lines)
        ctx.update(method=head.method, target=_clip(head.target))
        if head.method == "CONNECT":
            await self._tunnel_request(ctx, head, rest, reader, writer)
        elif head.target[:7].lower() == "http://":
            await self._http_request(ctx, head, rest, reader, writer)
        elif head.target[:8].lower() == "https://":
            raise HeadError(400, "https-needs-connect", "https goes through CONNECT")
        else:
            raise HeadError(405, "not-a-proxy-request",
                            "only CONNECT and absolute http:// requests are proxied")

    # -- the policy decision ---------------------------------------------------------

    def _target(self, authority: str, default_port: int) -> tuple[Target, bool]:
        """The normalised target and whether its host is an IP literal (any encoding)."""
        try:
            host, port = parse_authority(authority, default_port)
            if looks_numeric(host):
                return Target(host.lower(), port), True
            return Target(normalise_name(host), port), False
        except TargetError as exc:
            raise HeadError(400, exc.reason, exc.detail) from None

    async def _decide(self, target: Target, numeric: bool) -> _Decision:
        if numeric:
            return self._decide_literal(target)
        rule, why = match_rule(self.rules, target.host, target.port)
        if rule is None:
            raise Refusal(403, why, f"{target} is not in network.allow")
        addresses = await self._resolve(target)
        usable: list[IPAddress] = []
        skipped: list[dict[str, str]] = []
        for text in addresses:
            try:
                address = unwrap(ipaddress.ip_address(text))
            except ValueError:
                skipped.append({"address": text, "reason": "unparseable"})
                continue
            reason = refusal_reason(address, self.allow_private)
            if reason is None:
                usable.append(address)
            else:
                skipped.append({"address": str(address), "reason": reason})
        if not usable:
            reasons = ", ".join(sorted({s["reason"] for s in skipped}))
            raise Refusal(403, "address-forbidden",
                          f"{target.host} resolves only to refused addresses ({reasons})",
                          rule=rule.text, addresses=addresses, skipped=skipped)
        return _Decision(rule.text, addresses, usable, skipped)

    def _decide_literal(self, target: Target) -> _Decision:
        """An IP literal passes only in canonical form, listed in allow and covered by
        allow_private: encodings such as 2130706433 or ::ffff:7f00:1 exist to slip past
        checks, and a literal skips the name-based allowlist altogether otherwise."""
        literal = parse_ip_literal(target.host)
        if literal is None or str(literal) != target.host:
            raise Refusal(403, "ip-literal", "IP literals are refused (non-canonical form)")
        rule, _ = match_rule(self.rules, target.host, target.port)
        if rule is None:
            raise Refusal(403, "ip-literal", f"IP literal {target} is not in network.allow",
                          address=str(literal))
        reason = refusal_reason(literal, self.allow_private, explicit_only=True)
        if reason is not None:
            raise Refusal(403, "ip-literal",
                          f"IP literal {literal} ({reason}) is not covered by allow_private",
                          address=str(literal), rule=rule.text)
        return _Decision(rule.text, [str(literal)], [unwrap(literal)], [])

    async def _resolve(self, target: Target) -> list[str]:
        try:
            found = await asyncio.wait_for(self._resolver(target.host, target.port),
                                           self.limits.resolve_timeout)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise Refusal(502, "resolve-failed", f"cannot resolve {target.host}",
                          event="proxy.failed", error=_clip(str(exc) or type(exc).__name__)
                          ) from None
        # Dedupe, keep the resolver's order, and bound what a hostile DNS answer can
        # make the proxy judge, try and log.
        addresses = list(dict.fromkeys(str(a) for a in found))[:MAX_ADDRESSES]
        if not addresses:
            raise Refusal(502, "resolve-failed", f"{target.host} has no addresses",
                          event="proxy.failed")
        return addresses

    async def _open(self, target: Target, decision: _Decision) -> tuple[Streams, IPAddress]:
        """Connect to the first checked address that answers; nothing else is tried."""
        attempts: list[dict[str, str]] = []
        timeouts = 0
        for address in decision.usable:
            try:
                streams = await asyncio.wait_for(self._connector(address, target.port),
                                                 self.limits.connect_timeout)
                return streams, address
            except TimeoutError:
                timeouts += 1
                attempts.append({"address": str(address), "error": "timeout"})
            except OSError as exc:
                attempts.append({"address": str(address), "error": _clip(str(exc), 120)})
        status = 504 if timeouts == len(attempts) else 502
        raise Refusal(status, "connect-failed", f"cannot connect to {target}",
                      event="proxy.failed", rule=decision.rule, addresses=decision.addresses,
                      attempts=attempts)

    def _allowed(self, ctx: dict[str, Any], decision: _Decision, address: IPAddress,
                 **extra: Any) -> None:
        self._emit("proxy.allowed", **ctx, rule=decision.rule, address=str(address),
                   addresses=decision.addresses, skipped=decision.skipped, **extra)

    # -- CONNECT ---------------------------------------------------------------------

    async def _tunnel_request(self, ctx: dict[str, Any], head: RequestHead, rest: bytes,
                              reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        target, numeric = self._target(head.target, DEFAULT_PORT)
        ctx["target"] = str(target)
        # CONNECT routes by its request target; a differing Host header is at best a
        # confused client and at worst a probe for a lax upstream, so refuse it too.
        host_matches(head, target.host, target.port, target.port, required=False)
        decision = await self._decide(target, numeric)
        (up_r, up_w), address = await self._open(target, decision)
        self._allowed(ctx, decision, address)
        flow = _Flow(ctx["conn"], target, numeric, str(address))
        try:
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
        except BaseException:
            up_w.close()
            raise
        upload = self._upload_tunnel(flow, reader, up_w, rest)
        await self._relay(ctx, flow, upload, up_r, writer, up_w, end_on_down=False)

    async def _upload_tunnel(self, flow: _Flow, client: asyncio.StreamReader,
                             upstream: asyncio.StreamWriter, first: bytes) -> None:
        data = first or await self._read(client, flow)
        if data:
            data = await self._check_tls(flow, client, data)
            await self._write(upstream, data, flow, "up")
            await self._pump(client, upstream, flow, "up")
        elif upstream.can_write_eof():
            upstream.write_eof()

    async def _check_tls(self, flow: _Flow, client: asyncio.StreamReader, data: bytes) -> bytes:
        """Hold the client's first bytes until they are known not to be TLS or carry a
        ClientHello whose SNI is the CONNECT host; nothing reaches upstream before."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.tls_peek_timeout
        buf = data
        result = peek_client_hello(buf)
        while result is Peek.NEED_MORE:
            try:
                more = await asyncio.wait_for(client.read(self.limits.chunk),
                                              max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise self._tls_refusal(flow, "tls-timeout", "ClientHello incomplete") from None
            if not more:
                raise self._tls_refusal(flow, "tls-incomplete", "closed inside the ClientHello")
            buf += more
            result = peek_client_hello(buf)
        if result is Peek.NOT_TLS:
            flow.tls = False  # another protocol: the address and port check still holds
            return buf
        if not isinstance(result, ClientHello):
            raise self._tls_refusal(flow, "tls-malformed", "not a valid TLS ClientHello")
        flow.tls, flow.sni, flow.ech = True, result.sni, result.ech
        if result.sni is None and not flow.numeric:
            raise self._tls_refusal(flow, "sni-missing", "TLS ClientHello without SNI")
        if result.sni is not None and result.sni != flow.target.host:
            raise self._tls_refusal(flow, "sni-mismatch",
                                    f"TLS SNI {_clip(result.sni, 80)} is not {flow.target.host}")
        return buf

    @staticmethod
    def _tls_refusal(flow: _Flow, reason: str, detail: str) -> Refusal:
        return Refusal(403, reason, detail, respond=False, address=flow.address, sni=flow.sni)

    # -- plain HTTP ------------------------------------------------------------------

    async def _http_request(self, ctx: dict[str, Any], head: RequestHead, rest: bytes,
                            reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        authority, origin = split_absolute_http(head.target)
        target, numeric = self._target(authority, 80)
        ctx["target"] = str(target)
        # Virtual hosting routes on Host: it must name the target that was checked.
        host_matches(head, target.host, target.port, 80, required=True)
        length = content_length(head)
        decision = await self._decide(target, numeric)
        (up_r, up_w), address = await self._open(target, decision)
        # The path without its query: queries often carry tokens.
        self._allowed(ctx, decision, address, path=_clip(origin.partition("?")[0]))
        flow = _Flow(ctx["conn"], target, numeric, str(address), tls=False)
        upload = self._upload_body(flow, reader, up_w, forward_head(head, origin),
                                   rest[:length], length)
        await self._relay(ctx, flow, upload, up_r, writer, up_w, end_on_down=True)

    async def _upload_body(self, flow: _Flow, client: asyncio.StreamReader,
                           upstream: asyncio.StreamWriter, head: bytes, first: bytes,
                           length: int) -> None:
        """Exactly the declared body and nothing after it: a second request pipelined
        behind the first is never forwarded, so its Host is never unchecked."""
        await self._write(upstream, head + first, flow, "up")
        await self._pump(client, upstream, flow, "up", limit=length - len(first))

    # -- relaying --------------------------------------------------------------------

    async def _relay(self, ctx: dict[str, Any], flow: _Flow, upload: Coroutine[Any, Any, None],
                     up_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                     up_w: asyncio.StreamWriter, *, end_on_down: bool) -> None:
        up = asyncio.create_task(upload)
        down = asyncio.create_task(self._pump(up_r, client_w, flow, "down"))
        try:
            await self._wait_pumps(up, down, end_on_down)
        except Refusal as exc:
            flow.end = "refused"
            self._emit(exc.event, **ctx, status=exc.status, reason=exc.reason,
                       detail=exc.detail, **exc.fields)
        except _Idle:
            flow.end = "idle-timeout"
        except (ConnectionError, OSError):
            flow.end = "reset"
        except asyncio.CancelledError:
            flow.end = "shutdown"
            raise
        finally:
            # Everything that must happen runs before the first await: aclose() may
            # cancel this task again while it cleans up.
            for task in (up, down):
                task.cancel()
            up_w.close()
            self._emit("proxy.closed", **ctx, address=flow.address, bytes_up=flow.up,
                       bytes_down=flow.down,
                       duration_s=round(time.monotonic() - flow.started, 3),
                       end=flow.end, tls=flow.tls, sni=flow.sni, ech=flow.ech)
            await asyncio.gather(up, down, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(up_w.wait_closed(), 1.0)

    @staticmethod
    async def _wait_pumps(up: asyncio.Task[None], down: asyncio.Task[None],
                          end_on_down: bool) -> None:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise a refusal, idle timeout or reset
            if end_on_down and down in done:
                return

    async def _read(self, src: asyncio.StreamReader, flow: _Flow, n: int = 0) -> bytes:
        """One read, ending the flow once *neither* direction moved for idle_timeout."""
        idle = self.limits.idle_timeout
        while True:
            try:
                data = await asyncio.wait_for(src.read(n or self.limits.chunk), idle)
            except TimeoutError:
                if time.monotonic() - flow.last >= idle:
                    raise _Idle from None
                continue
            flow.last = time.monotonic()
            return data

    async def _write(self, dst: asyncio.StreamWriter, data: bytes, flow: _Flow,
                     direction: str) -> None:
        if not data:
            return
        dst.write(data)
        if direction == "up":
            flow.up += len(data)
        else:
            flow.down += len(data)
        try:
            await asyncio.wait_for(dst.drain(), self.limits.idle_timeout)
        except TimeoutError:
            raise _Idle from None  # the reader stopped reading
        flow.last = time.monotonic()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, flow: _Flow,
                    direction: str, *, limit: int | None = None) -> None:
        remaining = limit
        while remaining is None or remaining > 0:
            want = self.limits.chunk if remaining is None else min(self.limits.chunk, remaining)
            data = await self._read(src, flow, want)
            if not data:
                break
            await self._write(dst, data, flow, direction)
            if remaining is not None:
                remaining -= len(data)
        # Pass a half-close on so request/response protocols over the tunnel finish;
        # a bounded body upload leaves the upstream's side open for its response.
        if limit is None and dst.can_write_eof():
            with contextlib.suppress(OSError):
                dst.write_eof()
