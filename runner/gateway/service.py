"""The provider gateway: one per run, on a unix socket bound into the sandbox.

Each request from the sandbox is checked in this order, and the first failure is a
refusal in the provider's own error shape plus a `provider.refused` event:
route (method + path + query keys) -> JSON body -> model allowlist -> tools ->
provider-side fetches (content.py) -> request budget. What passes is forwarded with
the real credential and streamed back chunk by chunk; when it ends, one
`provider.request` event records it and its tokens are charged to the budget.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from runner.events.budgets import Budgets
from runner.events.limits import HostLimits
from runner.events.log import EventSink, Source
from runner.gateway import backends
from runner.gateway.backends import BACKENDS, BackendSpec, Family, Route
from runner.gateway.content import scan as scan_content
from runner.gateway.credentials import Credential, CredentialError, load_credential
from runner.gateway.headers import Scrubber, redact_text, request_headers, response_headers
from runner.gateway.http import HttpServer, Request, Response
from runner.gateway.record import (
    Exchange,
    Mismatch,
    Recorder,
    Replayer,
    body_hash,
    recordable_headers,
)
from runner.gateway.tools import check_tools
from runner.gateway.upstream import STREAM_ERRORS, UpstreamClient, UpstreamError, error_kind
from runner.gateway.usage import Usage, UsageMeter
from runner.policy.models import BudgetsPolicy, ProviderPolicy, ServiceLimits

SOURCE: Source = "gateway"
JSON = [("content-type", "application/json")]
# Both official SDKs honour this header: a refusal is final, retrying cannot help.
NO_RETRY = [("x-should-retry", "false")]
GENERATION_KINDS = frozenset({"messages", "responses", "chat", "generate", "ollama_chat"})
LIST_CAP = 8 * 1024 * 1024
HEALTH_PATH = "/airlock/health"
# The memory a parsed body is reckoned to take (measured, docs/security.md): per body
# byte, the parsed strings plus the copy re-encoded for the upstream; per JSON value,
# its object (a dict of one key is ~180 bytes, split over its `{` and `,`).
PARSE_BYTES = 2
PARSE_NODE = 128
DEFAULT_RESERVE = BudgetsPolicy.model_fields["reserve_output_tokens"].default


# Where each API names a request's output cap; ("kind", "") is the default for a kind.
_OUTPUT_CAP = {
    ("messages", ""): "max_tokens",
    ("responses", ""): "max_output_tokens",
    ("chat", ""): "max_tokens",
    ("chat", "openai"): "max_completion_tokens",  # reasoning models refuse max_tokens
    ("generate", ""): "num_predict",
    ("ollama_chat", ""): "num_predict",
}


def clip(text: str, n: int = 200) -> str:
    """Agent-chosen text as events and answers carry it: bounded."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.extra = status, reason, detail, extra


@dataclass
class _Call:
    """What is known about one request while it is checked, forwarded and streamed."""

    method: str
    path: str
    bytes_in: int
    t0: float = field(default_factory=time.monotonic)
    route: Route | None = None
    requested_model: str | None = None
    model: str | None = None
    stream: bool = False
    ttfb: float | None = None
    bytes_out: int = 0
    error: str | None = None
    settled: bool = False
    reserved: int = 0  # tokens held for this request until it is settled
    token_settled: bool = False


class ProviderGateway:
    def __init__(
        self,
        provider: ProviderPolicy,
        socket_path: Path,
        sink: EventSink,
        budgets: Budgets,
        *,
        record_path: Path | None = None,
        environ: Mapping[str, str] = os.environ,
        limits: ServiceLimits | None = None,
        host: HostLimits | None = None,
        reserve_output_tokens: int = DEFAULT_RESERVE,
    ) -> None:
        self.provider = provider
        self.limits = limits = limits or ServiceLimits()
        # Outside a run (the provider doctor, tests) the gateway still has its own budget.
        self.host = host or HostLimits(memory=limits.memory, refusals=limits.refusals,
                                       refusal_events=limits.refusal_events, sink=sink)
        self.reserve_output_tokens = reserve_output_tokens
        self.socket_path = Path(socket_path)
        self.sink = sink
        self.budgets = budgets
        self.record_path = record_path
        self._environ = environ
        self._replayer: Replayer | None = None
        if provider.backend == "replay":
            assert provider.replay_file is not None  # the policy model requires it
            self._replayer = Replayer(Path(provider.replay_file).expanduser())
            self.spec: BackendSpec = backends.replay_spec(self._replayer.backend)
        else:
            self.spec = BACKENDS[provider.backend]
        self._credential: Credential = Credential()
        self._client: UpstreamClient | None = None
        self._recorder: Recorder | None = None
        self._server = HttpServer(
            self._handle, max_body=limits.request_body, max_connections=limits.connections,
            head_timeout=limits.head_timeout, body_timeout=limits.body_timeout,
            memory=self.host, on_refused=self._server_refused)
        self._base_url = provider.base_url or self.spec.default_base_url
        self._seq = 0
        self.counts = {"requests": 0, "refused": 0}

    # -- public ---------------------------------------------------------------------

    @property
    def api_backend(self) -> str:
        """The API the agent speaks: the backend's, or the recorded one's for replay."""
        return self._replayer.backend if self._replayer else self.provider.backend

    def agent_env(self, base_url: str) -> dict[str, str]:
        """Variables for the agent inside, where the gateway is reached at `base_url`."""
        return backends.agent_env(self.api_backend, base_url)

    async def start(self) -> None:
        if self._replayer is None and not self._base_url and self.provider.backend != "vertex":
            raise CredentialError(f"backend {self.provider.backend} needs provider.base_url")
        self._credential = await load_credential(self.provider, self.spec, self._environ)
        if self._replayer is None:
            # No redirects, and nothing from the host's environment (a host HTTPS_PROXY
            # must not see the provider's key); TLS verified against httpx's trust store
            # plus the policy's ca_file, if any.
            ca_file = self.provider.ca_file
            self._client = UpstreamClient(
                ca_file=Path(ca_file).expanduser() if ca_file else None)
        if self.record_path is not None:
            self._recorder = Recorder(self.record_path, self.api_backend,
                                      self._credential.secrets())
        try:
            await self._server.start_unix(self.socket_path)
        except BaseException:
            await self._close_resources()
            raise
        upstream = None
        if self._replayer is not None:
            upstream = f"replay:{self._replayer.path}"
        elif self._base_url:
            parts = urlsplit(self._base_url)
            upstream = f"{parts.scheme}://{parts.netloc}"
        self.sink.emit("provider.gateway_started", SOURCE, backend=self.provider.backend,
                       upstream=upstream, socket=str(self.socket_path),
                       record=str(self.record_path) if self.record_path else None,
                       ca_file=self.provider.ca_file)

    async def aclose(self) -> None:
        await self._server.aclose()
        await self._close_resources()
        summary = self.host.summary(SOURCE)
        if summary is not None:
            self.sink.emit("provider.refused_summary", SOURCE, **summary)
        self.sink.emit("provider.gateway_stopped", SOURCE, backend=self.provider.backend,
                       memory_peak=self.host.peak, **self.counts)

    async def _close_resources(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        await self._credential.aclose()

    # -- checking -------------------------------------------------------------------

    async def _handle(self, req: Request) -> Response:
        if req.method == "GET" and req.path == HEALTH_PATH:
            # The readiness self-test's probe: answered here, never forwarded, not an event.
            return Response(200, JSON, b'{"ok":true}')
        call = _Call(req.method, req.path, len(req.body))
        family = self.spec.family_for(req.path)
        try:
            route, body, query = self._check(req, call)
            return await self._dispatch(req, call, route, body, query)
        except _Refused as r:
            return self._refuse(call.route.family if call.route else family, call, r)
        except Exception as exc:  # a bug must answer, not hang the agent
            call.error = redact_text(f"{type(exc).__name__}: {exc}", self._secrets())
            self._emit_request(call, 500, None, None)
            self._settle_tokens(call, 500, None)
            if call.route is not None:
                family = call.route.family
            return Response(500, JSON + NO_RETRY,
                            backends.error_body(family, 500, "airlock gateway error",
                                                "airlock_internal"))

    def _check(self, req: Request, call: _Call) -> tuple[Route, dict[str, Any] | None, str]:
        route, known = self.spec.match(req.method, req.path)
        if route is None:
            if known:
                raise _Refused(403, "method_not_allowed",
                               f"{req.method} {req.path} is not part of the "
                               f"{self.spec.name} API the policy allows")
            raise _Refused(403, "path_not_allowed",
                           f"{clip(req.path, 120)} is not part of the {self.spec.name} API the "
                           "policy allows")
        call.route = route
        query, bad = backends.filter_query(route, req.query)
        if bad:
            raise _Refused(403, "query_not_allowed",
                           f"query parameter(s) {', '.join(bad)} not allowed on {req.path}")
        body: dict[str, Any] | None = None
        if req.method == "POST":
            body = self._parse(req)
        self._check_model(req, route, body, call)
        media = 0
        if body is not None:
            refusal = check_tools(route.kind, body, self.provider.hosted_tools,
                                  self.provider.tools)
            if refusal is not None:
                raise _Refused(403, refusal.reason, refusal.detail, tool=refusal.tool)
            p = self.provider
            content = scan_content(route.kind, body, url_sources=p.url_sources,
                                   stored_prompts=p.stored_prompts, background=p.background)
            if content.refusal is not None:
                raise _Refused(403, content.refusal.reason, content.refusal.detail,
                               where=content.refusal.where)
            media = content.media_bytes
        call.stream = self._is_stream(route, body)
        # Last, so a request refused for policy costs no budget. A request past the
        # budget is charged anyway: that trips the budget and ends the run (exit 4).
        if self.budgets.would_exceed("requests"):
            if self.budgets.tripped is None:
                self.budgets.charge("requests", 1, source=SOURCE)
            raise _Refused(429, "budget", "the run's provider request or token budget is "
                           "spent", counter=(self.budgets.tripped.counter
                                             if self.budgets.tripped else "requests"))
        if body is not None and route.kind in GENERATION_KINDS:
            self._reserve_tokens(route, body, len(req.body) - media, media, call)
        self.budgets.charge("requests", 1, source=SOURCE)
        return route, body, query

    def _reserve_tokens(self, route: Route, body: dict[str, Any], text_bytes: int,
                        media_bytes: int, call: _Call) -> None:
        """Hold the most this request can cost before it goes upstream.

        Its output cap (or, when it names none, `reserve_output_tokens`, which the
        gateway then sets as its cap when the run has a token budget, so that the
        reservation holds) plus an estimate of its input: 4 bytes of text a token, and
        base64 media at 100 bytes a token (an image costs ~1.6k tokens whatever its
        size). One that does not fit what is left is refused and trips the budget."""
        field_name = _OUTPUT_CAP.get((route.kind, self.api_backend)) or _OUTPUT_CAP.get(
            (route.kind, ""))
        holder: dict[str, Any] = body
        if route.kind in ("generate", "ollama_chat"):
            options = body.get("options")
            holder = options if isinstance(options, dict) else {}
        cap = holder.get(field_name) if field_name else None
        if field_name == "max_completion_tokens" and cap is None:
            cap = body.get("max_tokens")  # the older spelling, still accepted
        input_tokens = text_bytes // 4 + media_bytes // 100
        budgeted = self.budgets.limits.get("tokens") is not None
        if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
            cap = self.reserve_output_tokens
            left = self.budgets.remaining("tokens")
            if left is not None:
                cap = max(min(cap, left - input_tokens), 1)
            if budgeted and field_name and route.kind != "messages":
                if route.kind in ("generate", "ollama_chat"):
                    body["options"] = {**holder, field_name: cap}
                else:
                    body[field_name] = cap
        needed = input_tokens + cap
        if not self.budgets.reserve("tokens", needed):
            self.budgets.refuse("tokens", needed, source=SOURCE)
            raise _Refused(429, "budget", f"the request may cost {needed} tokens (output cap "
                           f"{cap} + ~{input_tokens} input), more than the run's token "
                           "budget has left", counter="tokens")
        call.reserved = needed

    def _settle_tokens(self, call: _Call, status: int, usage: Usage | None) -> None:
        """Once per request: give back its reservation, charge what it cost. An answer
        whose final usage never came (the agent hung up, the stream was cut, the
        provider left it out) is charged its whole reservation."""
        if call.token_settled or call.route is None or \
                call.route.kind not in GENERATION_KINDS:
            return
        call.token_settled = True
        spent = usage.total if usage is not None else 0
        if 200 <= status < 300 and (usage is None or not usage.final):
            spent = max(spent, call.reserved)
        self.budgets.settle("tokens", call.reserved, spent, source=SOURCE)

    def _parse(self, req: Request) -> dict[str, Any]:
        """The body as JSON, once its parsing cost is known to fit the run's limits.

        Parsed JSON takes many times its size in memory (an empty object, 2 bytes, is a
        64-byte dict), so before parsing: at most `json_nodes` values (every `{`, `[` and
        `,` counted, a bound whatever the strings hold), and room in the run's memory
        budget for the parsed objects and the copy sent upstream."""
        raw = req.body
        nodes = raw.count(b"{") + raw.count(b"[") + raw.count(b",")
        if nodes > self.limits.json_nodes:
            raise _Refused(413, "json_too_large",
                           f"the request body has up to {nodes} JSON values; the policy's "
                           f"network.limits.json_nodes allows {self.limits.json_nodes}")
        if not req.hold(PARSE_BYTES * len(raw) + PARSE_NODE * nodes):
            raise _Refused(503, "memory", "the run's gateway is holding as much request "
                           "data as network.limits.memory allows; retry when requests finish")
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            raise _Refused(400, "bad_request", "the request body is not a JSON object "
                           "(or is nested too deeply)")
        return parsed

    def _check_model(self, req: Request, route: Route, body: dict[str, Any] | None,
                     call: _Call) -> None:
        if route.model_at == "none":
            return
        if route.model_at == "path":
            m = route.path.fullmatch(req.path)
            requested: Any = unquote(m.group("model")) if m else None
        else:
            assert body is not None
            requested = body.get("model") or (body.get("name") if route.kind == "show" else None)
        call.requested_model = requested if isinstance(requested, str) else None
        if not call.requested_model:
            raise _Refused(403, "model_not_allowed", "the request names no model")
        model = self._resolve(call.requested_model)
        if model is None:
            raise _Refused(403, "model_not_allowed",
                           f"model {clip(call.requested_model, 120)!r} is not in the policy's "
                           "allowlist")
        call.model = model
        if body is not None:
            body["model"] = model  # the upstream always gets the full id
            if route.kind == "show" and "name" in body:
                body["name"] = model

    def _resolve(self, name: str) -> str | None:
        p = self.provider
        resolved = p.resolve_model(name)
        if resolved is None and self._replayer is not None and not p.allowed_models():
            # A replay policy without models allows what the recording used, by the
            # names the recorded agent used.
            resolved = self._replayer.models.get(name)
        if resolved is None and self.api_backend == "ollama":
            alt = name[: -len(":latest")] if name.endswith(":latest") else (
                f"{name}:latest" if ":" not in name else None)
            resolved = p.resolve_model(alt) if alt else None
        return resolved

    @staticmethod
    def _is_stream(route: Route, body: dict[str, Any] | None) -> bool:
        if body is None:
            return False
        default = route.kind in ("generate", "ollama_chat")  # Ollama streams by default
        return bool(body.get("stream", default))

    def _refuse(self, family: Family, call: _Call, r: _Refused) -> Response:
        self._record_refusal(r.status, r.reason, r.detail, method=call.method,
                             path=call.path, model=call.requested_model, **r.extra)
        return Response(r.status, JSON + NO_RETRY,
                        backends.error_body(family, r.status, f"airlock: {clip(r.detail)}",
                                            f"airlock_{r.reason}"))

    def _server_refused(self, status: int, reason: str, detail: str) -> None:
        """A request or connection the HTTP server refused (a limit) before any handler."""
        self._record_refusal(status, reason, detail)

    def _record_refusal(self, status: int, reason: str, detail: str, **fields: Any) -> None:
        """One event per refusal, every agent-chosen field clipped (a 60 KB path is
        logged as 200 characters, once), and only the first `refusal_events` of them:
        past that they are counted for one summary at the end. Refusals without end
        end the run (HostLimits)."""
        self.counts["refused"] += 1
        if not self.host.refusal(SOURCE, reason):
            return
        data = {k: clip(v) if isinstance(v, str) else v for k, v in fields.items()}
        self.sink.emit("provider.refused", SOURCE, backend=self.provider.backend,
                       reason=reason, detail=clip(detail, 400), status=status, **data)

    # -- forwarding -----------------------------------------------------------------

    async def _dispatch(self, req: Request, call: _Call, route: Route,
                        body: dict[str, Any] | None, query: str) -> Response:
        self._seq += 1
        self.counts["requests"] += 1
        if route.kind == "chat" and call.stream and body is not None:
            # Ask for the usage chunk so the token budget cannot be dodged by leaving
            # it out; official SDKs and Codex read past it.
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                      "include_usage": True}
        exchange = None
        if self._recorder is not None:
            exchange = Exchange(self._seq, req.method, req.path, query, call.model, call.stream,
                                body_hash(req.body), recordable_headers(req.headers), body,
                                requested_model=call.requested_model)
        if self._replayer is not None:
            return self._replay(req, call, route, exchange)
        return await self._forward(req, call, route, body, query, exchange)

    def _upstream_target(self, req: Request, call: _Call, route: Route,
                         body: dict[str, Any] | None, query: str) -> tuple[str, Any]:
        if self.provider.backend == "vertex":
            assert body is not None and self.provider.project and self.provider.region
            return backends.vertex_request(self.provider.base_url, self.provider.project,
                                           self.provider.region, route, body)
        path = req.path
        if route.model_at == "path" and call.model:
            path = path[: path.rindex("/") + 1] + quote(call.model, safe="")
        assert self._base_url is not None
        return backends.upstream_url(self.provider.backend, self._base_url, route, path,
                                     query), body

    async def _forward(self, req: Request, call: _Call, route: Route,
                       body: dict[str, Any] | None, query: str,
                       exchange: Exchange | None) -> Response:
        assert self._client is not None
        url, out_body = self._upstream_target(req, call, route, body, query)
        headers = request_headers(req.headers)
        headers += list((await self._credential.headers()).items())
        headers.append(("accept-encoding", "identity"))
        content = None
        if out_body is not None:
            content = json.dumps(out_body, ensure_ascii=False, separators=(",", ":")).encode()
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("content-type", "application/json"))
        try:
            upstream = await self._client.send(req.method, url, headers, content)
        except UpstreamError as exc:
            call.error = redact_text(f"upstream unreachable: {exc.kind}: {exc}",
                                     self._secrets())
            self._emit_request(call, 502, None, None)
            self._settle_tokens(call, 502, None)
            return Response(502, JSON, backends.error_body(
                route.family, 502, "airlock: the provider could not be reached",
                "airlock_upstream_unreachable"))
        secrets = self._secrets()
        out_headers = response_headers(upstream.headers, secrets)
        request_id = upstream.header("request-id") or upstream.header("x-request-id")
        meter = UsageMeter(upstream.header("content-type"))
        if exchange is not None:
            exchange.status, exchange.response_headers = upstream.status, out_headers

        def settle() -> None:
            self._finish(call, upstream.status, meter, request_id, exchange)

        async def finalise(error: BaseException | None) -> None:
            await upstream.aclose()
            if error is not None and call.error is None:
                call.error = f"client went away: {type(error).__name__}"
            settle()

        if route.lists_models and upstream.status == 200:
            raw = b""
            try:
                async for chunk in upstream.stream:
                    raw += chunk
                    if len(raw) > LIST_CAP:
                        break
            except STREAM_ERRORS as exc:
                call.error = f"upstream failed: {error_kind(exc)}"
            data = Scrubber(secrets).feed(self._filter_listing(route, raw))
            call.bytes_out = len(data)
            call.ttfb = time.monotonic()
            if exchange is not None:
                exchange.add_chunk(data)
            return Response(upstream.status, out_headers, data, finalise)

        return Response(upstream.status, out_headers,
                        self._relay(upstream.stream, call, meter, secrets, exchange,
                                    settle), finalise)

    async def _relay(self, chunks: AsyncIterable[bytes], call: _Call, meter: UsageMeter,
                     secrets: list[str], exchange: Exchange | None,
                     settle: Callable[[], None]) -> AsyncIterator[bytes]:
        """Pass chunks on as they come; meter, scrub and record them on the way.

        `settle` (event, tokens charged, recording) runs when the upstream is done and
        before the agent gets the end of the response, so an agent never sees a
        completed answer whose tokens are not yet on the budget.
        """
        scrub = Scrubber(secrets)
        try:
            async for chunk in chunks:
                meter.feed(chunk)
                out = scrub.feed(chunk)
                if out:
                    if call.ttfb is None:
                        call.ttfb = time.monotonic()
                    call.bytes_out += len(out)
                    if exchange is not None:
                        exchange.add_chunk(out)
                    yield out
        except STREAM_ERRORS as exc:
            # Re-raised: the agent's connection is cut without the final chunk, so a
            # truncated stream cannot pass for a complete one.
            call.error = f"upstream failed mid-stream: {error_kind(exc)}"
            raise
        tail = scrub.flush()
        if tail:
            call.bytes_out += len(tail)
            if exchange is not None:
                exchange.add_chunk(tail)
            yield tail
        settle()

    def _filter_listing(self, route: Route, raw: bytes) -> bytes:
        """Model listings show only the models the policy allows (a courtesy: the
        allowlist is enforced per request either way)."""
        try:
            obj = json.loads(raw)
        except ValueError:
            return raw
        key, field_names = ("models", ("name", "model")) if route.kind == "tags" \
            else ("data", ("id",))
        items = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(items, list):
            return raw
        obj[key] = [it for it in items if isinstance(it, dict) and any(
            isinstance(it.get(f), str) and self._resolve(it[f]) for f in field_names)]
        return json.dumps(obj).encode()

    def _replay(self, req: Request, call: _Call, route: Route,
                exchange: Exchange | None) -> Response:
        assert self._replayer is not None
        got = self._replayer.take(req.method, req.path, call.model, call.stream)
        if isinstance(got, Mismatch):
            self._settle_tokens(call, 409, None)
            self.counts["refused"] += 1
            self.sink.emit("provider.replay_mismatch", SOURCE, index=got.index,
                           expected=got.expected, got=got.got, detail=got.message)
            return Response(409, JSON + NO_RETRY, backends.error_body(
                route.family, 409, f"airlock: {got.message}", "airlock_replay_mismatch"))
        recorded = got
        meter = UsageMeter(dict(recorded.response_headers).get("content-type"))
        replay_info = {"index": recorded.seq,
                       "body_match": recorded.body_sha256 == body_hash(req.body)}
        if exchange is not None:
            exchange.status, exchange.response_headers = (recorded.status,
                                                          recorded.response_headers)

        async def chunks() -> AsyncIterator[bytes]:
            for _t, data in recorded.chunks:
                yield data

        def settle() -> None:
            self._finish(call, recorded.status, meter, None, exchange, replay=replay_info)

        async def finalise(error: BaseException | None) -> None:
            if error is not None and call.error is None:
                call.error = f"client went away: {type(error).__name__}"
            settle()

        return Response(recorded.status, list(recorded.response_headers),
                        self._relay(chunks(), call, meter, [], exchange, settle), finalise)

    # -- accounting -----------------------------------------------------------------

    def _secrets(self) -> list[str]:
        return self._credential.secrets()

    def _finish(self, call: _Call, status: int, meter: UsageMeter, request_id: str | None,
                exchange: Exchange | None, replay: dict[str, Any] | None = None) -> None:
        if call.settled:  # once, at the end of the stream or when the exchange is cut
            return
        call.settled = True
        usage = meter.finish()
        self._emit_request(call, status, usage.as_event(), request_id, replay=replay)
        if exchange is not None and self._recorder is not None:
            self._recorder.set_secrets(self._secrets())
            self._recorder.write(exchange)
        self._settle_tokens(call, status, usage)

    def _emit_request(self, call: _Call, status: int, usage: dict[str, Any] | None,
                      request_id: str | None, replay: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        data: dict[str, Any] = {
            "backend": self.provider.backend, "method": call.method, "path": call.path,
            "model": call.model, "status": status, "stream": call.stream,
            "latency_ms": round((now - call.t0) * 1000, 2),
            "ttfb_ms": round((call.ttfb - call.t0) * 1000, 2) if call.ttfb else None,
            "bytes_in": call.bytes_in, "bytes_out": call.bytes_out,
        }
        if call.requested_model and call.requested_model != call.model:
            data["requested_model"] = call.requested_model
        data.update(usage or {"input_tokens": None, "output_tokens": None,
                              "cache_read_tokens": None, "cache_write_tokens": None,
                              "stop_reason": None})
        cost = self.provider.cost_usd(call.model or call.requested_model,
                                      data.get("input_tokens"), data.get("output_tokens"),
                                      data.get("cache_read_tokens"))
        if cost is not None:
            data["cost_usd"] = cost
        if request_id:
            data["request_id"] = request_id
        if replay is not None:
            data["replay"] = replay
        if call.error:
            data["error"] = call.error
        self.sink.emit("provider.request", SOURCE, **data)

