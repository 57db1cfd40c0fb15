"""Past runs on disk: listing, reports, events, and verifying a log's hash chain."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.errors import BadInput
from runner.events.verify import verify_log
from runner.run.orchestrator import runs_dir


def run_path(run_id: str) -> Path:
    path = runs_dir() / run_id
    if run_id in ("latest", "last"):
        runs = sorted(p for p in runs_dir().glob("*") if p.is_dir())
        if not runs:
            raise BadInput(f"no runs in {runs_dir()}")
        path = runs[-1]
    if not path.is_dir() or "/" in run_id:
        raise BadInput(f"no run {run_id!r} in {runs_dir()}")
    return path


def list_runs(limit: int) -> list[dict[str, Any]]:
    out = []
    for path in sorted(runs_dir().glob("*"), reverse=True)[:limit]:
        report = path / "report.json"
        if report.is_file():
            out.append(json.loads(report.read_text()))
        elif path.is_dir():
            out.append({"run_id": path.name, "status": "running-or-lost"})
    return out


def load_report(run_id: str) -> dict[str, Any]:
    path = run_path(run_id) / "report.json"
    if not path.is_file():
        raise BadInput(f"run {run_id} has no report (still running, or its host died)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def iter_events(run_id: str, *, follow: bool, types: list[str]) -> Iterator[str]:
    path = run_path(run_id) / "events.jsonl"
    with path.open("rb") as fh:
        partial = b""
        while True:
            raw = fh.readline()
            if raw:
                partial += raw
                if not partial.endswith(b"\n"):
                    continue
                line, partial = partial.decode("utf-8", errors="replace").rstrip("\n"), b""
                if types:
                    try:
                        kind = json.loads(line).get("type", "")
                    except ValueError:
                        kind = ""
                    if not any(kind.startswith(t) for t in types):
                        continue
                yield line
                continue
            if not follow or (run_path(run_id) / "report.json").is_file():
                return
            time.sleep(0.2)


def verify(run_id: str) -> list[str]:
    path = run_path(run_id)
    report = path / "report.json"
    expected = json.loads(report.read_text()) if report.is_file() else None
    return verify_log(path / "events.jsonl", run_id=path.name, report=expected)
