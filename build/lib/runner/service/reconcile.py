"""On start: what this host left behind when it last stopped without draining (kill -9).

Each run the store still has as running (or lost) on this host is settled: its
container, found by Airlock's labels, is removed; the run keeps its real end when the
log recorded one (`run.end`) or the container had exited, and is `lost` otherwise. The
events log stays as it was written (a valid, verifiable prefix).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from runner.engines.base import Engine
from runner.service.store import RunRecord, Store

log = logging.getLogger("airlock.service")

_END = {"succeeded": "succeeded", "failed": "failed", "budget_exceeded": "budget",
        "timeout": "timeout", "cancelled": "cancelled", "interrupted": "cancelled"}


def _logged_end(run_dir: str | None) -> tuple[str, int | None, str | None] | None:
    if not run_dir:
        return None
    path = Path(run_dir) / "events.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for raw in reversed(lines[-50:]):
        with contextlib.suppress(ValueError, AttributeError):
            event = json.loads(raw)
            if event.get("type") == "run.end":
                d = event.get("data") or {}
                return (_END.get(str(d.get("status")), "failed"), d.get("exit_code"),
                        d.get("exit_reason"))
    return None


def _settle(store: Store, engine: Engine | None, rec: RunRecord) -> str:
    if engine is not None:
        for obj in engine.managed():
            if obj.run_id == rec.id:
                with contextlib.suppress(Exception):
                    engine.remove_object(obj)
    # Without a `run.end` nobody saw how it ended (a container's exit code alone does
    # not say: a budget or a cancel also ends it): lost.
    status, code, reason = _logged_end(rec.run_dir) or ("lost", None, "host_restarted")
    store.finish(rec.id, status, code, reason)
    return status


def reconcile(store: Store, engine: Engine | None, host_id: str) -> dict[str, str]:
    """Settle this host's unfinished runs; return {run id: status now}."""
    out: dict[str, str] = {}
    for rec in store.runs_of_host(host_id, ["running", "lost"]):
        if rec.status == "lost" and rec.exit_reason != "host_lost":
            continue
        out[rec.id] = _settle(store, engine, rec)
    if out:
        log.warning("reconciled %d run(s) left by this host's last process: %s", len(out),
                    ", ".join(f"{k}={v}" for k, v in out.items()))
    return out
