"""The HTTP API (FastAPI): runs, their events, patches and usage, per tenant.

Every answer is JSON (`{"error": "one line"}` when refused) except the event stream,
the patch and `/metrics`. A tenant sees only its own runs: another tenant's run id is
answered exactly as an unknown one (404). Request bodies are capped before they are
read whole (413), and nothing is created until the whole request has been checked.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# at definition time, and they name dependencies defined inside create_app().
import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runner.policy.models import Policy
from runner.service.config import Config, TenantConfig
from runner.service.dispatch import Dispatcher
from runner.service.floors import Refused, apply_on_floor, resolve_workspace
from runner.service.follow import follow_lines, sse
from runner.service.keys import match_key
from runner.service.metrics import Metrics
from runner.service.schemas import (
    Error,
    Health,
    HostInfo,
    Hosts,
    RunCreated,
    RunInfo,
    RunList,
    RunRequest,
    Usage,
)
from runner.service.store import Quota as StoreQuota
from runner.service.store import QuotaExceeded, RunRecord, Store, StoreError, new_run_id
from runner.view import tenant_runs_for, view_app

log = logging.getLogger("airlock.service")

MAX_BODY = 1 << 20
# Event streams one tenant may hold open at once. Each polls the log and the database
# while it lasts; measured without a cap: 400 streams of one tenant took 1.1 cores of
# this 2-core host and slowed another tenant's `GET /v1/runs/{id}` from 1.5 to 390 ms.
MAX_STREAMS = 32
STREAM_RETRY_AFTER = 5
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DRAIN_RETRY_AFTER = 30


@dataclass
class ServiceState:
    config: Config
    store: Store
    dispatcher: Dispatcher
    host_id: str
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.config, self.store, self.dispatcher)
        self.tenant_keys = {n: t.key_sha256 for n, t in self.config.tenants.items()}
        self.streams: dict[str, int] = {}  # open event streams per tenant (event loop only)


class _CountedStream(StreamingResponse):
    """A streaming response that gives its tenant's stream slot back however it ends
    (finished, the client gone, cancelled): the slot is taken before it is returned."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- the body cap (pure ASGI: it answers 413 before the body is read whole) ------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                await _plain_error(send, 400, "Content-Length is not a number")
                return
            if too_big:
                await _plain_error(send, 413, f"the body is larger than {self.limit} bytes")
                return
        # Without a length (chunked), read up to the limit and no further.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await _plain_error(send, 413, f"the body is larger than {self.limit} bytes")
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _plain_error(send: Send, status: int, message: str) -> None:
    import json

    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# -- helpers -----------------------------------------------------------------------------


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the body is not valid JSON"
    msgs = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc)
        kind = e.get("type")
        if kind == "extra_forbidden":
            msg = "unknown field"
        elif kind == "missing":
            msg = "required field is missing"
        else:
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        msgs.append(f"{where}: {msg}" if where else msg)
    return 422, _one_line("; ".join(msgs) or "invalid request")


def _info(rec: RunRecord) -> RunInfo:
    return RunInfo(id=rec.id, status=rec.status,
                   exit_code=rec.exit_code, exit_reason=rec.exit_reason,
                   usage=dict(rec.usage), agent=(rec.request or {}).get("agent"),
                   created_at=rec.created_at, started_at=rec.started_at, ended_at=rec.ended_at)


def _store_quota(tenant: TenantConfig) -> StoreQuota:
    q = tenant.quota
    return StoreQuota(concurrent=q.concurrent, queued=q.queued, runs_per_day=q.runs_per_day,
                      tokens_per_day=q.tokens_per_day)


def _check_model(policy: Policy, model: str | None) -> None:
    provider = policy.provider
    if model is None or provider is None:
        return
    if provider.resolve_model(model) is None:
        allowed = ", ".join(sorted({*provider.models, *provider.allowed_models()}))
        raise Refused(422, f"model: {model!r} is not allowed by the policy "
                      f"(allowed: {allowed or 'none'})")


# -- the app -----------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Malformed input (not JSON, bad YAML, bad workspace)."},
    401: {"model": Error, "description": "No key, or a wrong one."},
    403: {"model": Error, "description": "The policy would widen the tenant's floor, or the "
          "workspace is outside the tenant's root."},
    404: {"model": Error, "description": "No such run for this tenant."},
    413: {"model": Error, "description": "The body is too large."},
    422: {"model": Error, "description": "Fields of the wrong type, unknown or missing."},
    429: {"model": Error, "description": "Over a quota; see Retry-After."},
    503: {"model": Error, "description": "The host is draining, or its database is away."},
}


def create_app(state: ServiceState) -> Any:
    app = FastAPI(title="Airlock", version="1", docs_url=None, redoc_url=None,
                  description="Run agents in throwaway sandboxes for many tenants.")
    bearer = HTTPBearer(auto_error=False)
    store = state.store
    config = state.config
    metrics = state.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and kind != "application/json" and any(
                tuple(e.get("loc", ())) == ("body",) for e in exc.errors()):
            return JSONResponse({"error": "the body must be a JSON object sent as "
                                 "Content-Type: application/json"}, status_code=400)
        status, message = _validation_message(exc)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": _one_line(str(exc.detail))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        log.error("store: %s", exc)
        return JSONResponse({"error": "the service's database is not available"},
                            status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error"}, status_code=500)

    def tenant_of(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                  ) -> TenantConfig:
        name = match_key(creds.credentials if creds else None, state.tenant_keys)
        if name is None:
            raise ApiError(401, "a valid tenant key is needed (Authorization: Bearer <key>)",
                           {"WWW-Authenticate": "Bearer"})
        return config.tenants[name]

    def operator(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        digests = {"operator": config.operator_key_sha256} if config.operator_key_sha256 else {}
        if match_key(creds.credentials if creds else None, digests) is None:
            raise ApiError(401, "the operator key is needed", {"WWW-Authenticate": "Bearer"})

    Tenant = Annotated[TenantConfig, Depends(tenant_of)]

    def own_run(run_id: str, tenant: TenantConfig) -> RunRecord:
        rec = store.get_run(run_id, tenant.name) if _RUN_ID.match(run_id) else None
        if rec is None:
            raise ApiError(404, f"no run {run_id!r}")
        return rec

    @app.post("/v1/runs", status_code=201, response_model=RunCreated, responses=ERRORS,
              summary="Queue a run")
    def create_run(body: RunRequest, tenant: Tenant, response: Response) -> RunCreated:
        if state.dispatcher.draining:
            raise ApiError(503, "this host is draining and takes no new runs",
                           {"Retry-After": str(DRAIN_RETRY_AFTER)})
        try:
            policy = apply_on_floor(tenant, body.policy)
            _check_model(policy, body.model)
            workspace = resolve_workspace(tenant, body.workspace)
        except Refused as exc:
            metrics.refused.labels(tenant.name, f"http_{exc.status}").inc()
            raise
        request: dict[str, Any] = {"agent": body.agent, "policy": policy.model_dump(mode="json"),
                   "model": body.model, "workspace": str(workspace) if workspace else None}
        if body.agent == "command":
            request["command"] = list(body.command or [])
            if body.image:
                request["image"] = body.image
        else:
            request["task"] = body.task
        try:
            rec = store.create_run(tenant.name, request, quota=_store_quota(tenant),
                                   run_id=new_run_id())
        except QuotaExceeded as exc:
            metrics.refused.labels(tenant.name, f"quota_{exc.which}").inc()
            raise ApiError(429, str(exc), {"Retry-After": str(max(1, int(exc.retry_after_s)))}) \
                from None
        metrics.created.labels(tenant.name).inc()
        state.dispatcher.wake()
        response.headers["Location"] = f"/v1/runs/{rec.id}"
        return RunCreated(id=rec.id, status=rec.status)

    @app.get("/v1/runs/{run_id}", response_model=RunInfo, responses=ERRORS, summary="A run")
    def get_run(run_id: str, tenant: Tenant) -> RunInfo:
        return _info(own_run(run_id, tenant))

    @app.post("/v1/runs/{run_id}/cancel", response_model=RunInfo, responses=ERRORS,
              summary="Cancel a run")
    def cancel_run(run_id: str, tenant: Tenant) -> RunInfo:
        own_run(run_id, tenant)
        rec = store.request_cancel(run_id, tenant.name)
        if rec is None:
            raise ApiError(404, f"no run {run_id!r}")
        if rec.status == "running":
            state.dispatcher.cancel_local(run_id)  # on another host: its loop sees the flag
        return _info(rec)

    @app.get("/v1/runs", response_model=RunList, responses=ERRORS, summary="The caller's runs")
    def list_runs(tenant: Tenant, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  cursor: Annotated[str | None, Query(max_length=64)] = None,
                  status: Annotated[list[str] | None, Query()] = None) -> RunList:
        records, nxt = store.list_runs(tenant.name, limit=limit, cursor=cursor, statuses=status)
        return RunList(runs=[_info(r) for r in records], next=nxt)

    def host_address(host_id: str | None) -> str | None:
        if host_id is None or host_id == state.host_id:
            return None
        for h in store.hosts():
            if h.host_id == host_id and h.alive and h.address:
                return h.address
        return None

    async def relayed(address: str, path: str, request: Request,
                      params: dict[str, str]) -> Any:
        """The body of the host that holds the run's files, relayed as it comes."""
        import httpx

        if address.startswith("unix:"):
            client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=address[5:]),
                                       base_url="http://airlock", timeout=None, trust_env=False)
        else:
            client = httpx.AsyncClient(base_url=f"http://{address}", timeout=None,
                                       trust_env=False)
        headers = {k: v for k, v in request.headers.items()
                   if k in ("authorization", "last-event-id")}
        try:
            async with client.stream("GET", path, params=params, headers=headers) as upstream:
                if upstream.status_code == 200:
                    async for chunk in upstream.aiter_raw():
                        yield chunk
        except httpx.HTTPError as exc:
            log.warning("relay from %s: %s", address, exc)
        finally:
            await client.aclose()

    @app.get("/v1/runs/{run_id}/events", responses={
        **ERRORS, 200: {"content": {"text/event-stream": {}, "application/x-ndjson": {}},
                        "description": "The run's events as they happen; ends with the run."}},
        summary="Follow a run's events")
    async def events(run_id: str, tenant: Tenant, request: Request,
                     format: Annotated[str, Query(pattern="^(sse|jsonl)$")] = "sse"
                     ) -> StreamingResponse:
        rec = await run_in_threadpool(own_run, run_id, tenant)
        if state.streams.get(tenant.name, 0) >= MAX_STREAMS:
            metrics.refused.labels(tenant.name, "http_429").inc()
            raise ApiError(429, f"tenant {tenant.name} has {MAX_STREAMS} event streams open "
                           "already; close one first", {"Retry-After": str(STREAM_RETRY_AFTER)})
        local = config.runs_dir / tenant.name / rec.id / "events.jsonl"
        last = request.headers.get("last-event-id", "")
        after = int(last) if last.isdigit() else 0
        fmt: Callable[[bytes], bytes] = (lambda line: line + b"\n") if format == "jsonl" else sse

        def path_of() -> Path | None:
            return local if local.exists() else None

        def ended() -> bool:
            r = store.get_run(rec.id, tenant.name)
            return r is None or r.ended

        async def body() -> Any:
            r: RunRecord | None = rec
            # A queued run has no host yet: which one holds its log is known once claimed.
            while r is not None and r.host_id is None and not r.ended and not local.exists():
                await asyncio.sleep(0.2)
                r = await run_in_threadpool(store.get_run, rec.id, tenant.name)
            if r is not None and not local.exists() and r.host_id not in (None, state.host_id):
                # Several hosts, one database: the log is on the host that ran it.
                address = await run_in_threadpool(host_address, r.host_id)
                if address is not None:
                    async for chunk in relayed(address, f"/v1/runs/{rec.id}/events", request,
                                               {"format": format}):
                        yield chunk
                return
            async for line in follow_lines(path_of, ended, after_seq=after):
                yield fmt(line)

        # Taken here, on the event loop, with no await between the check and the take.
        state.streams[tenant.name] = state.streams.get(tenant.name, 0) + 1

        def release() -> None:
            state.streams[tenant.name] -= 1

        if format == "jsonl":
            return _CountedStream(body(), media_type="application/x-ndjson", release=release)
        return _CountedStream(body(), media_type="text/event-stream", release=release,
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/runs/{run_id}/patch", responses={
        **ERRORS, 200: {"content": {"text/x-diff": {}},
                        "description": "The changes of a copy-mode workspace."}},
        summary="A copy-mode run's patch")
    async def patch(run_id: str, tenant: Tenant, request: Request) -> Response:
        rec = await run_in_threadpool(own_run, run_id, tenant)
        path = config.runs_dir / tenant.name / rec.id / "changes.patch"
        if not rec.ended:
            raise ApiError(409, "the run has not ended; its patch comes at its end")
        if not path.parent.exists():
            address = await run_in_threadpool(host_address, rec.host_id)
            if address is not None:
                # Relayed as it comes, never gathered whole (a patch is up to 32 MiB).
                upstream = relayed(address, f"/v1/runs/{rec.id}/patch", request, {})
                first = await anext(upstream, None)
                if first is not None:
                    async def rest() -> Any:
                        yield first
                        async for chunk in upstream:
                            yield chunk

                    return StreamingResponse(rest(), media_type="text/x-diff")
                await upstream.aclose()
        if not path.is_file():
            raise ApiError(404, "the run has no patch (no copy-mode workspace, or no changes)")
        # Sent from the file as the client reads it: a patch is up to patch_size (32 MiB),
        # and read whole, 40 clients reading slowly held the service at +930 MB.
        return FileResponse(path, media_type="text/x-diff")

    @app.get("/v1/usage", response_model=Usage, responses=ERRORS, summary="The caller's usage")
    def usage(tenant: Tenant, since: Annotated[date | None, Query()] = None) -> Usage:
        q = tenant.quota
        counts = store.counts().get(tenant.name, {})
        return Usage(tenant=tenant.name, since=since.isoformat() if since else None,
                     totals=store.usage(tenant.name, since),
                     by_day=store.usage_by_day(tenant.name, since),
                     active={"queued": counts.get("queued", 0),
                             "running": counts.get("running", 0)},
                     quota={"concurrent": q.concurrent, "queued": q.queued,
                            "runs_per_day": q.runs_per_day, "tokens_per_day": q.tokens_per_day})

    @app.get("/healthz", response_model=Health, summary="Liveness (no key)")
    def healthz() -> Health:
        return Health(status="draining" if state.dispatcher.draining else "ok",
                      host=state.host_id, running=state.dispatcher.running,
                      capacity=state.dispatcher.capacity)

    @app.get("/metrics", responses={401: ERRORS[401], 200: {
        "content": {"text/plain": {}}, "description": "Prometheus text format."}},
        summary="Usage and queues per tenant (operator key)")
    def prometheus(_: Annotated[None, Depends(operator)]) -> Response:
        metrics.draining.set(1 if state.dispatcher.draining else 0)
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/admin/hosts", response_model=Hosts, responses={401: ERRORS[401]},
             summary="The hosts sharing the queue (operator key)")
    def hosts(_: Annotated[None, Depends(operator)]) -> Hosts:
        return Hosts(hosts=[HostInfo(host_id=h.host_id, address=h.address, alive=h.alive,
                                     heartbeat_at=h.heartbeat_at, expires_at=h.expires_at)
                            for h in store.hosts()])

    # The run viewer's pages (runner/view) under /view/: the same keys and the same 404
    # rule as this API (a tenant sees its own runs, the operator all of them). The page
    # itself holds no run data; it asks for the key and sends it with each of its calls.
    operator_digests = ({"operator": config.operator_key_sha256}
                        if config.operator_key_sha256 else {})

    @app.get("/view", include_in_schema=False)
    def view_slash() -> Response:
        return RedirectResponse("/view/", status_code=308)

    app.mount("/view", view_app(tenant_runs_for(
        config.runs_dir, lambda key: match_key(key, state.tenant_keys),
        lambda key: match_key(key, operator_digests) is not None)))

    wrapped = BodyLimit(app)
    wrapped.fastapi = app  # type: ignore[attr-defined]
    return wrapped
