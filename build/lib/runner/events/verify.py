"""Verify a run log's hash chain: every edit, removal, insertion, reordering, and a torn
or cut tail is reported with the first line that is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.events.log import genesis_hash, line_hash


def verify_log(path: Path, *, run_id: str, report: dict[str, Any] | None = None) -> list[str]:
    problems: list[str] = []
    prev = genesis_hash(run_id)
    seq = 0
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    for n, raw in enumerate(lines, start=1):
        try:
            event = json.loads(raw)
        except ValueError:
            return [f"{path}:{n}: not a JSON line"]
        if event.get("run_id") != run_id:
            return [f"{path}:{n}: belongs to run {event.get('run_id')!r}, not {run_id!r}"]
        if event.get("prev") != prev:
            # The chain breaks one line after an edit (the edited line still carries a
            # valid `prev`; its successor records the old hash). A continuous sequence
            # number says the line before was changed; a gap or a step back says lines
            # were removed, inserted or moved here.
            if n > 1 and event.get("seq") == seq + 1:
                return [f"{path}:{n - 1}: line edited (its hash no longer matches the "
                        f"record in line {n})"]
            return [f"{path}:{n}: hash chain broken (a line removed, inserted or moved here)"]
        if event.get("seq") != seq + 1:
            return [f"{path}:{n}: sequence number {event.get('seq')} where {seq + 1} was due"]
        seq = event["seq"]
        prev = line_hash(raw)
    if tail:
        problems.append(f"{path}:{len(lines) + 1}: truncated line at the end of the log")
    elif report is not None and (report.get("events") != seq or report.get("last_hash") != prev):
        problems.append(
            f"{path}:{len(lines) + 1}: the log ends at event {seq} but report.json "
            f"recorded {report.get('events')} events (lines removed from the end)"
        )
    return problems
