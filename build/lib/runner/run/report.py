"""`report.json`: what a run did, in one file next to its event log."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_PATCH_MAX = 1 << 20  # a larger patch is only in changes.patch, not inline here


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    # succeeded | failed | budget_exceeded | timeout | oom | interrupted | cancelled | not_ready | error
    status: str
    exit_code: int
    # command | agent | budget | wall_time | oom | interrupted | cancelled | selftest | sandbox | disk
    # | error
    exit_reason: str
    agent: str
    policy: str | None
    policy_digest: str
    image: str
    duration_s: float
    budgets: dict[str, dict[str, int | None]]
    durations: dict[str, float | None] = field(default_factory=dict)
    refused: list[dict[str, Any]] = field(default_factory=list)
    image_digest: str | None = None
    error: str | None = None
    patch: str | None = None
    # Changes not in the patch: {"count": n, "files": [{"path", "reason", "size"}, ...]}
    left_out: dict[str, Any] | None = None
    selftest: dict[str, Any] | None = None
    result: Any = None
    events: int = 0
    last_hash: str = ""

    @property
    def totals(self) -> dict[str, int]:
        return {k: int(v.get("used") or 0) for k, v in self.budgets.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        if self.patch is not None and len(self.patch) > REPORT_PATCH_MAX:
            # changes.patch has it; inline, JSON's escapes of non-UTF-8 bytes could make
            # the report six times the patch's size.
            d["patch"] = None
            d["patch_file"] = "changes.patch"
        d["totals"] = self.totals
        return d


def write_report(result: RunResult) -> Path:
    path = result.run_dir / "report.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    tmp.replace(path)
    return path
