"""The viewer's HTTP side: static page files and a JSON API over runs.

    GET  /                        the page (hash routes: #/ the runs, #/run/ID a run)
    GET  /static/{file}           its script, style sheet and icon (package files)
    GET  /api/runs                the runs the caller sees, newest first
    GET  /api/runs/{id}           one run: report, counts, refusals, meters, chain, policy
    GET  /api/runs/{id}/events    a page of its log (?page=N), or a filtered read from a
                                  byte offset (?offset=&line=&cat=&q=)
    GET  /api/runs/{id}/patch     the copy-mode patch

Every request of the API asks `runs_for(request)` which runs it may see: None answers
401 (no or a wrong key), and a run outside the source it returns answers 404, exactly as
a run that does not exist (a tenant learns nothing of another's runs). Each
response is bounded (lines per page, bytes per line, bytes per response, bytes scanned
per request): a 100 MB log is never read whole into memory, nor sent to the page.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runner.events.budgets import COUNTERS
from runner.view.index import (
    CATEGORIES,
    PAGE_LINES,
    RESPONSE_BYTES,
    SCAN_BUDGET,
    LogIndex,
    category,
    read_lines,
)
from runner.view.source import RunSource, TenantRuns, bearer_key

# The runs a request may see (the caller's own, or all of them), or None: not let in.
RunsFor = Callable[[Request], RunSource | None]

LIST_LIMIT = 500  # runs per list response
LIST_SCAN = 64 << 20  # log bytes a list request indexes, over all its runs
REPORT_CAP = 32 << 20  # a report.json larger than this is not parsed
POLICY_CAP = 256 << 10
PATCH_CAP = 2 << 20
RAW_SHOWN = 4000  # characters of an unparseable line sent to the page
QUERY_CAP = 200
INDEXES = 2 * LIST_LIMIT  # runs whose index is kept: more than one list shows

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "icon.svg": "image/svg+xml"}


class SecurityHeaders:
    """The same strict headers on every response, errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": headers + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _static(name: str) -> bytes:
    return (resources.files("runner.view") / "static" / name).read_bytes()


class _Runs:
    """Indexes and parsed reports, kept for the runs seen last (LRU)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, LogIndex] = OrderedDict()
        self._reports: OrderedDict[str, tuple[tuple[int, int], dict[str, Any] | None]] = OrderedDict()

    def index(self, run_id: str, run_dir: Path) -> LogIndex:
        key = str(run_dir)
        with self._lock:
            idx = self._indexes.get(key)
            if idx is None:
                idx = self._indexes[key] = LogIndex(run_dir / "events.jsonl", run_id)
            self._indexes.move_to_end(key)
            while len(self._indexes) > INDEXES:
                self._indexes.popitem(last=False)
            return idx

    def report(self, run_dir: Path) -> dict[str, Any] | None:
        """report.json without its bulky parts (patch, self-test), or None if not written."""
        path = run_dir / "report.json"
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        key = str(run_dir)
        with self._lock:
            hit = self._reports.get(key)
            if hit is not None and hit[0] == stamp:
                self._reports.move_to_end(key)
                return hit[1]
        report: dict[str, Any] | None
        if st.st_size > REPORT_CAP:
            report = {"unreadable": f"report.json is larger than {REPORT_CAP >> 20} MiB"}
        else:
            try:
                loaded = json.loads(path.read_bytes())
                report = loaded if isinstance(loaded, dict) else {"unreadable": "not an object"}
            except (OSError, ValueError):
                report = {"unreadable": "report.json is not valid JSON"}
            report.pop("run_dir", None)  # a host path: not for a tenant's eyes
            report.pop("patch", None)
            report.pop("selftest", None)
            report.pop("result", None)
        with self._lock:
            self._reports[key] = (stamp, report)
            while len(self._reports) > 4 * INDEXES:
                self._reports.popitem(last=False)
        return report


def _read_json(path: Path, cap: int) -> Any:
    try:
        with path.open("rb") as fh:
            data = fh.read(cap + 1)
    except OSError:
        return None
    if len(data) > cap:
        return {"unreadable": f"{path.name} is larger than {cap >> 10} KiB"}
    try:
        return json.loads(data)
    except ValueError:
        return {"unreadable": f"{path.name} is not valid JSON"}


def _limits(report: dict[str, Any] | None, policy: Any) -> dict[str, int | None]:
    limits: dict[str, int | None] = dict.fromkeys(COUNTERS)
    budgets = report.get("budgets") if report else None
    if isinstance(budgets, dict):
        for c in COUNTERS:
            entry = budgets.get(c)
            if isinstance(entry, dict) and isinstance(entry.get("limit"), int):
                limits[c] = entry["limit"]
        return limits
    if isinstance(policy, dict):  # a running run: its policy.json, written at its start
        from runner.policy.units import parse_size

        pb = policy.get("budgets")
        pb = pb if isinstance(pb, dict) else {}
        for c in ("steps", "requests", "tokens", "mcp_calls"):
            if isinstance(pb.get(c), int):
                limits[c] = pb[c]
        res = policy.get("resources")
        res = res if isinstance(res, dict) else {}
        with contextlib.suppress(ValueError):
            limits["output_bytes"] = parse_size(res.get("output_bytes"))
    return limits


def _report_used(report: dict[str, Any] | None) -> dict[str, int | None]:
    used: dict[str, int | None] = dict.fromkeys(COUNTERS)
    budgets = report.get("budgets") if report else None
    if isinstance(budgets, dict):
        for c in COUNTERS:
            entry = budgets.get(c)
            if isinstance(entry, dict) and isinstance(entry.get("used"), int):
                used[c] = entry["used"]
    return used


def _verification(idx: LogIndex, report: dict[str, Any] | None, lost: bool) -> dict[str, Any]:
    v = idx.verification(report)
    if lost and v["state"] == "running":
        return {"state": "unfinished", "line": None,
                "message": "the run never ended (no report): the lines written are intact"}
    return v


def _main_model(idx: LogIndex) -> str | None:
    counter = idx.models or idx.agent_models
    return counter.most_common(1)[0][0] if counter else None


LOST_AFTER = 300  # seconds past its wall time that a run without a report must be gone


def _lost(run_dir: Path, report: dict[str, Any] | None) -> bool:
    """No report, and the log still since longer than the run could have lasted: its host
    died (or was stopped) before writing one."""
    if report is not None:
        return False
    from runner.policy.units import parse_duration

    try:
        quiet = time.time() - (run_dir / "events.jsonl").stat().st_mtime
    except OSError:
        quiet = time.time() - run_dir.stat().st_mtime
    policy = _read_json(run_dir / "policy.json", POLICY_CAP)
    wall = 600.0
    res = policy.get("resources") if isinstance(policy, dict) else None
    if isinstance(res, dict):
        with contextlib.suppress(ValueError):
            wall = parse_duration(res.get("wall_time", wall))
    return quiet > wall + LOST_AFTER


def _row(run_id: str, report: dict[str, Any] | None, idx: LogIndex,
         lost: bool = False) -> dict[str, Any]:
    r = report or {}
    start = idx.start or {}
    used = _report_used(report)
    return {
        "id": run_id,
        "status": r.get("status") or ("lost" if lost else "running" if report is None
                                      else "unknown"),
        "exit_code": r.get("exit_code"),
        "exit_reason": r.get("exit_reason"),
        "agent": r.get("agent") or start.get("agent"),
        "policy": r.get("policy") or start.get("policy"),
        "model": _main_model(idx),
        "started": idx.first_ts,
        "duration_s": r.get("duration_s") if report else (
            round(idx.last_ts - idx.first_ts, 3) if idx.first_ts and idx.last_ts else None),
        "tokens": used["tokens"] if used["tokens"] is not None else idx.meters.values["tokens"],
        "requests": used["requests"] if used["requests"] is not None else idx.requests,
        "refusals": idx.refusal_count if idx.done else len(r.get("refused") or []),
        "events": idx.lines,
        "chain": _verification(idx, report, lost)["state"],
        "live": report is None and not lost,
    }


def tenant_runs_for(runs_dir: Path, tenant_of: Callable[[str | None], str | None],
                    is_operator: Callable[[str | None], bool]) -> RunsFor:
    """For a service: the caller's Bearer key shows a tenant `<runs_dir>/<tenant>/` and
    the operator every tenant's runs; no or a wrong key, nothing (401). The two callables
    are the service's own key checks (constant time), so the page admits exactly whom its
    API admits:

        app.mount("/view", view_app(tenant_runs_for(config.runs_dir,
                                                     lambda k: match_key(k, tenant_keys),
                                                     is_operator_key)))
    """
    tenants = TenantRuns(runs_dir)

    def runs_for(request: Request) -> RunSource | None:
        key = bearer_key(request.headers.get("authorization"))
        if key is None:
            return None
        if is_operator(key):
            return tenants.everyone()
        name = tenant_of(key)
        return tenants.of(name) if name is not None else None

    return runs_for


def view_app(runs_for: RunsFor) -> ASGIApp:
    runs = _Runs()
    page = _static("index.html")

    def locate(request: Request) -> tuple[str, Path] | Response:
        source = runs_for(request)
        if source is None:
            return JSONResponse({"error": "a key is needed"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        run_id = request.path_params["run_id"]
        run_dir = source.run_dir(run_id)
        if run_dir is None:
            return JSONResponse({"error": "no such run"}, 404)
        return run_id, run_dir

    def index_page(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", 404, media_type="text/plain")
        return Response(_static(name), media_type=STATIC[name])

    def list_runs(request: Request) -> Response:
        source = runs_for(request)
        if source is None:
            return JSONResponse({"error": "a key is needed"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        budget = LIST_SCAN
        rows: list[dict[str, Any]] = []
        pending = False
        for run_id in source.run_ids():
            if len(rows) >= LIST_LIMIT:
                break
            run_dir = source.run_dir(run_id)
            if run_dir is None:
                continue
            idx = runs.index(run_id, run_dir)
            before = idx.offset
            if budget > 0:
                idx.refresh(min(budget, SCAN_BUDGET))
                budget -= max(0, idx.offset - before)
            pending = pending or not idx.done
            report = runs.report(run_dir)
            rows.append(_row(run_id, report, idx, _lost(run_dir, report)))
        return JSONResponse({"runs": rows, "pending": pending, "limit": LIST_LIMIT})

    def run_summary(request: Request) -> Response:
        found = locate(request)
        if isinstance(found, Response):
            return found
        run_id, run_dir = found
        idx = runs.index(run_id, run_dir)
        idx.refresh()
        report = runs.report(run_dir)
        lost = _lost(run_dir, report)
        policy = _read_json(run_dir / "policy.json", POLICY_CAP)
        try:
            patch_bytes: int | None = (run_dir / "changes.patch").stat().st_size
        except OSError:
            patch_bytes = None
        with idx.lock:
            body = {
                "id": run_id,
                "row": _row(run_id, report, idx, lost),
                "report": report,
                "start": idx.start,
                "end": idx.end,
                "log": {"lines": idx.lines, "size": idx.size, "indexed": idx.offset,
                        "done": idx.done, "page_lines": PAGE_LINES,
                        "pages": max(1, (idx.lines + PAGE_LINES - 1) // PAGE_LINES),
                        "unparsed": idx.unparsed},
                "categories": {c: idx.by_category.get(c, 0) for c in CATEGORIES},
                "types": dict(idx.by_type.most_common(60)),
                "refusals": idx.refusals,
                "refusal_count": idx.refusal_count,
                "models": dict(idx.models.most_common()),
                "agent_models": dict(idx.agent_models.most_common()),
                "requests": idx.requests,
                "latency_ms_avg": round(idx.latency_ms / idx.requests, 1) if idx.requests else None,
                "first_ts": idx.first_ts,
                "last_ts": idx.last_ts,
                "widened": idx.widened,
                "selftest": idx.selftest,
                "verification": _verification(idx, report, lost),
                "meters": {"counters": list(COUNTERS), "limits": _limits(report, policy),
                           "report_used": _report_used(report),
                           "series": idx.meters.series(idx.last_ts)},
                "policy": policy,
                "patch": {"bytes": patch_bytes} if patch_bytes is not None else None,
            }
        return JSONResponse(body)

    def run_events(request: Request) -> Response:
        found = locate(request)
        if isinstance(found, Response):
            return found
        run_id, run_dir = found
        q = request.query_params
        try:
            limit = max(1, min(int(q.get("limit", PAGE_LINES)), 500))
            page = int(q["page"]) if "page" in q else None
            offset = max(0, int(q.get("offset", 0)))
            first_line = max(1, int(q.get("line", 1)))
        except ValueError:
            return JSONResponse({"error": "page, offset, line and limit are numbers"}, 400)
        cats = {c for c in q.get("cat", "").split(",") if c in CATEGORIES}
        needle = q.get("q", "")[:QUERY_CAP].lower()
        idx = runs.index(run_id, run_dir)
        if page is not None:
            idx.refresh()
            with idx.lock:
                if page < 0 or page >= len(idx.page_offsets):
                    return JSONResponse({"events": [], "pending": not idx.done,
                                         "error": None if not idx.done else "no such page"},
                                        200 if not idx.done else 404)
                offset, first_line = idx.page_offsets[page], page * PAGE_LINES + 1
                limit = PAGE_LINES
        with idx.lock:
            broken = idx.check.problem[0] if idx.check.problem else None
        out: list[dict[str, Any]] = []
        sent = 0
        next_offset, next_line = offset, first_line
        try:
            lines = read_lines(run_dir / "events.jsonl", offset, first_line,
                               limit=limit if not (cats or needle) else 1 << 30)
            for ln in lines:
                next_offset, next_line = ln.offset + ln.size, ln.line + 1
                if needle and (ln.text is None or needle not in ln.text.lower()):
                    continue
                if sent >= RESPONSE_BYTES and not (cats or needle):
                    # A page keeps its numbering whole: past the response's bytes, a line
                    # is named, not sent.
                    item = _line_item(ln.line, ln.offset, ln.size, None)
                    item["raw"] = (f"(a line of {ln.size} bytes, not sent: this page of the "
                                   f"log is over {RESPONSE_BYTES >> 20} MiB)")
                else:
                    item = _line_item(ln.line, ln.offset, ln.size, ln.text)
                if cats and item["cat"] not in cats:
                    continue
                item["broken"] = ln.line == broken
                out.append(item)
                sent += ln.size if item["event"] is not None else len(item["raw"] or "")
                if len(out) >= limit or (sent >= RESPONSE_BYTES and (cats or needle)):
                    break
        except OSError:
            return JSONResponse({"error": "the log cannot be read"}, 404)
        try:
            at_end = next_offset >= os.path.getsize(run_dir / "events.jsonl")
        except OSError:
            at_end = True
        return JSONResponse({"events": out, "next_offset": next_offset, "next_line": next_line,
                             "at_end": at_end, "page": page})

    def run_patch(request: Request) -> Response:
        found = locate(request)
        if isinstance(found, Response):
            return found
        _, run_dir = found
        try:
            with (run_dir / "changes.patch").open("rb") as fh:
                data = fh.read(PATCH_CAP + 1)
        except OSError:
            return JSONResponse({"error": "this run has no patch"}, 404)
        return JSONResponse({"text": data[:PATCH_CAP].decode("utf-8", "replace"),
                             "truncated": len(data) > PATCH_CAP})

    app = Starlette(routes=[
        Route("/", index_page),
        Route("/static/{name}", static),
        Route("/api/runs", list_runs),
        Route("/api/runs/{run_id}", run_summary),
        Route("/api/runs/{run_id}/events", run_events),
        Route("/api/runs/{run_id}/patch", run_patch),
    ])
    return SecurityHeaders(app)


def _line_item(line: int, offset: int, size: int, text: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {"line": line, "offset": offset, "size": size, "event": None,
                            "raw": None, "cat": "error"}
    if text is None:
        item["raw"] = f"(a line of {size} bytes, too long to show)"
        return item
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if isinstance(event, dict) and isinstance(event.get("type"), str) \
            and isinstance(event.get("source"), str):
        item["event"] = event
        item["cat"] = category(event["type"], event["source"])
    else:
        item["raw"] = text[:RAW_SHOWN]
    return item
