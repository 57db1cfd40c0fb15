"""After a crash: settle the runs a host had started, and remove what they left behind.

A service killed with SIGKILL (or a machine that went down) leaves run records that
say `running`, sandboxes that may still exist, and event logs without an end. On
start, before it takes new runs, a host calls `reconcile`: each run of this host that
the database still calls running gets its real end when its report was written (the
run finished, the record did not follow), else `lost`; the sandboxes of this host's
runs are removed (found by their run label, and by the container the run recorded,
which is how a pooled sandbox is found); an event log without an end gets a `run.end`
line that continues its hash chain, so it still verifies. Queued runs are not touched:
they go on.

Runs whose container is held by a live process (the same host id started twice) are
left alone: they are not this process's to judge.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.engines.base import Engine, ManagedObject
from runner.events.log import genesis_hash, line_hash
from runner.run.owner import owner_alive
from runner.service.store.base import Store

log = logging.getLogger("airlock.service")

# Runs marked lost longer ago than this are not looked at again (what they left, if
# anything, is `airlock gc`'s): a host's start does not grow with its history.
LOST_WINDOW_S = 7 * 86400

# What report.json's status becomes in the service's vocabulary (DESIGN.md, "The service").
_STATUS = {
    "succeeded": "succeeded",
    "failed": "failed",
    "budget_exceeded": "budget",
    "timeout": "timeout",
    "cancelled": "cancelled",
    "interrupted": "cancelled",
}


def service_status(report_status: str) -> str:
    """A run's end (report.json `status`) as one of the service's statuses: oom, disk,
    not_ready, error and the like are `failed`, with report's exit_reason saying why."""
    return _STATUS.get(report_status, "failed")


def usage_from_report(report: dict[str, Any]) -> dict[str, float]:
    """The counters a report carries (the gateway's and MCP's authoritative totals)."""
    out: dict[str, float] = {}
    for name, value in (report.get("totals") or {}).items():
        if isinstance(value, int | float):
            out[name] = float(value)
    if isinstance(report.get("duration_s"), int | float):
        out["wall_s"] = float(report["duration_s"])
    return out


@dataclass
class Reconciled:
    ended: list[str] = field(default_factory=list)  # real end recorded from report.json
    lost: list[str] = field(default_factory=list)  # marked lost
    removed: list[str] = field(default_factory=list)  # engine objects removed
    logs_closed: list[str] = field(default_factory=list)  # run.end appended
    kept: list[str] = field(default_factory=list)  # held by a live process


def _read_events(path: Path) -> tuple[list[dict[str, Any]], bytes | None, bool]:
    """The log's events, the last complete line's bytes, and whether it ends cleanly."""
    try:
        data = path.read_bytes()
    except OSError:
        return [], None, False
    lines = data.split(b"\n")
    tail = lines.pop()
    events = []
    for raw in lines:
        try:
            events.append(json.loads(raw))
        except ValueError:
            return events, None, False
    return events, (lines[-1] if lines else None), not tail


def close_log(path: Path, run_id: str, **data: Any) -> bool:
    """Append `run.end` to a log that has none, continuing its hash chain. A log that
    is torn or does not verify is left as it is (verification reports it)."""
    from runner.events.verify import verify_log

    events, last, clean = _read_events(path)
    if not clean or any(e.get("type") == "run.end" for e in events):
        return False
    if verify_log(path, run_id=run_id):
        return False
    event = {"seq": len(events) + 1, "ts": round(time.time(), 6), "run_id": run_id,
             "type": "run.end", "source": "host",
             "prev": line_hash(last) if last is not None else genesis_hash(run_id),
             "data": data}
    line = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    with path.open("ab") as fh:
        fh.write(line + b"\n")
    return True


def _containers_in_log(events: list[dict[str, Any]]) -> set[str]:
    return {str(e["data"]["container"]) for e in events
            if e.get("type") in ("sandbox.created", "sandbox.claimed")  # cold, or pooled
            and isinstance(e.get("data"), dict)
            and e["data"].get("container")}


def reconcile(store: Store, host_id: str, engine: Engine | None, runs_dir: Path) -> Reconciled:
    """Settle this host's runs after a crash; call once at start, before claiming."""
    out = Reconciled()
    since = time.time() - LOST_WINDOW_S
    mine = [r for r in store.runs_of_host(host_id, ["running", "lost"])
            if r.status == "running" or (r.ended_at or 0) >= since]
    objects: list[ManagedObject] = engine.managed() if engine is not None else []
    for rec in mine:
        run_dir = Path(rec.run_dir) if rec.run_dir else _run_dir(runs_dir, rec.tenant, rec.id)
        events, _, _ = _read_events(run_dir / "events.jsonl")
        ids = {c for c in (rec.container, *_containers_in_log(events)) if c}
        held = [o for o in objects
                if o.run_id == rec.id or any(o.id.startswith(c) for c in ids)]
        if any(owner_alive(o.owner) for o in held):
            out.kept.append(rec.id)
            continue
        for obj in held:
            try:
                assert engine is not None
                engine.remove_object(obj)
                out.removed.append(f"{obj.kind} {obj.id[:12]} (run {rec.id})")
            except Exception as exc:  # the engine is away: `airlock gc` removes it later
                log.warning("run %s: could not remove %s %s: %s", rec.id, obj.kind,
                            obj.id[:12], exc)
        if rec.status == "running":
            report = _report(run_dir)
            if report is not None and report.get("run_id") == rec.id:
                store.finish(rec.id, service_status(str(report.get("status"))),
                             report.get("exit_code"), report.get("exit_reason"),
                             usage_from_report(report))
                out.ended.append(rec.id)
                continue
            logged = _logged_end(events)
            if logged is not None:  # the run ended; its report was not written
                store.finish(rec.id, *logged)
                out.ended.append(rec.id)
                continue
            store.finish(rec.id, "lost", None, "host_restarted")
            out.lost.append(rec.id)
        if close_log(run_dir / "events.jsonl", rec.id, status="lost", exit_code=None,
                     exit_reason=rec.exit_reason if rec.status == "lost" else "host_restarted"):
            out.logs_closed.append(rec.id)
    return out


def _logged_end(events: list[dict[str, Any]]) -> tuple[str, int | None, str | None] | None:
    """How the log says the run ended, when it got as far as `run.end`."""
    for event in reversed(events):
        if event.get("type") == "run.end":
            d = event.get("data") if isinstance(event.get("data"), dict) else {}
            code = d.get("exit_code")
            reason = d.get("exit_reason")
            return (service_status(str(d.get("status"))),
                    code if isinstance(code, int) else None,
                    str(reason) if reason is not None else None)
    return None


def _run_dir(runs_dir: Path, tenant: str, run_id: str) -> Path:
    """Where a run that recorded no directory lives: per tenant, or flat."""
    per_tenant = runs_dir / tenant / run_id
    return per_tenant if per_tenant.is_dir() else runs_dir / run_id


def _report(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
