"""Verify a run log's hash chain: every edit, removal, insertion, reordering, and a torn
or cut tail is reported with the first line that is wrong.

`ChainCheck` takes the log one line at a time, so a log is never held in memory whole:
`verify_log` streams a file through it, and `airlock view` feeds it a growing log as it
is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.events.log import genesis_hash, line_hash


class ChainCheck:
    """The chain state after the lines fed so far; stops at the first problem.

    `problem` is `(line number, message)` once a line is wrong (the line an edit is
    reported on can be the one before the line that showed it).
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.prev = genesis_hash(run_id)
        self.seq = 0
        self.lines = 0
        self.problem: tuple[int, str] | None = None

    def feed(self, raw: bytes, event: dict[str, Any] | None = None) -> bool:
        """One complete line without its newline (and its parsed JSON, when the caller
        has it already); False once the chain is broken."""
        if self.problem is not None:
            return False
        self.lines += 1
        n = self.lines
        if event is None:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return self._broken(n, "not a JSON line")
            event = parsed
        if event.get("run_id") != self.run_id:
            return self._broken(n, f"belongs to run {event.get('run_id')!r}, not {self.run_id!r}")
        if event.get("prev") != self.prev:
            # The chain breaks one line after an edit (the edited line still carries a
            # valid `prev`; its successor records the old hash). A continuous sequence
            # number says the line before was changed; a gap or a step back says lines
            # were removed, inserted or moved here.
            if n > 1 and event.get("seq") == self.seq + 1:
                return self._broken(n - 1, f"line edited (its hash no longer matches the "
                                           f"record in line {n})")
            return self._broken(n, "hash chain broken (a line removed, inserted or moved here)")
        if event.get("seq") != self.seq + 1:
            return self._broken(n, f"sequence number {event.get('seq')} where {self.seq + 1} was due")
        self.seq = event["seq"]
        self.prev = line_hash(raw)
        return True

    def unreadable(self, message: str) -> None:
        """The next line cannot be checked (too long to hold, say): the chain stops there."""
        if self.problem is None:
            self.lines += 1
            self._broken(self.lines, message)

    def finish(self, *, torn_tail: bool, report: dict[str, Any] | None) -> tuple[int, str] | None:
        """The problem with the log as a whole, given what follows the last full line."""
        if self.problem is not None:
            return self.problem
        if torn_tail:
            return (self.lines + 1, "truncated line at the end of the log")
        if report is not None and (report.get("events") != self.seq
                                   or report.get("last_hash") != self.prev):
            recorded = report.get("events")
            last = max(self.lines, 1)
            if recorded == self.seq:
                return (last, "line edited (its hash no longer matches the one report.json "
                              "recorded for the last event)")
            if isinstance(recorded, int) and recorded > self.seq:
                # The first line that is missing: the log ends before it.
                return (self.lines + 1, f"the log ends at event {self.seq} but report.json "
                                        f"recorded {recorded} events (lines removed from "
                                        "here on)")
            return (last, f"the log goes on to event {self.seq} but report.json recorded "
                          f"{recorded} events (lines added at the end, or the report changed)")
        return None

    def _broken(self, n: int, message: str) -> bool:
        self.problem = (n, message)
        return False


def verify_log(path: Path, *, run_id: str, report: dict[str, Any] | None = None) -> list[str]:
    check = ChainCheck(run_id)
    torn = False
    try:
        with path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    torn = True
                    break
                if not check.feed(raw[:-1]):
                    break
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror}"]
    problem = check.finish(torn_tail=torn, report=report)
    return [] if problem is None else [f"{path}:{problem[0]}: {problem[1]}"]
