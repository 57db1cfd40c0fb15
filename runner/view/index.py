"""What the viewer knows of one run's log, learnt in one pass and kept up to date.

A `LogIndex` reads `events.jsonl` from where it stopped last time, a bounded number of
bytes per call, so that a 100 MB log is indexed over a few requests (the page shows the
progress) and a running run's log is followed as it grows. It keeps only bounded
summaries: counts, the first refusals, the budget meters sampled over time, the chain
check's state and the byte offset of every page of the timeline. The lines themselves
stay on disk; `read_lines` serves them a page at a time.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.events.budgets import COUNTERS
from runner.events.log import TRUSTED_SOURCES
from runner.events.verify import ChainCheck

MAX_LINE = 16 << 20  # a line longer than this is skipped, not held (producers cap far below)
PAGE_LINES = 200  # lines per timeline page; the index keeps each page's byte offset
SCAN_BUDGET = 32 << 20  # bytes indexed per call: a huge log is indexed over several calls
MAX_REFUSALS = 500
MAX_WIDENED = 100
MAX_MODELS = 20
MAX_TYPES = 200
SERIES_POINTS = 400  # budget meter samples kept per run (thinned by halves past twice that)
TEXT_CAP = 300  # characters of any agent-written string the index keeps

CATEGORIES = ("lifecycle", "selftest", "agent", "provider", "mcp", "proxy", "budget",
              "refusal", "error")

# Agent events that record a completed action (a step of the `steps` budget). The
# builtin loop and Codex number their steps (`step`); Claude Code's parser marks its
# actions by type. Agent events are the agent's own word: the meter drawn from them is
# what the log says, and the report's count (the host's) is shown beside it.
CLAUDE_STEP_TYPES = frozenset({"agent.step", "agent.command", "agent.file_change",
                               "agent.mcp_call", "agent.tool_result"})


def category(etype: str, source: str) -> str:
    trusted = source in TRUSTED_SOURCES
    if trusted and etype.endswith((".refused", ".unauthorized")):
        return "refusal"
    if source == "agent":
        return "agent"
    if etype.startswith("budget.") or etype == "log.cap":
        return "budget"
    if etype == "selftest":
        return "selftest"
    if etype.endswith((".error", "_failed")) or etype == "provider.replay_mismatch":
        return "error"
    for prefix in ("provider", "mcp", "proxy"):
        if etype.startswith(prefix + "."):
            return prefix
    return "lifecycle"


def is_step(etype: str, data: dict[str, Any]) -> bool:
    if "step" in data:
        return isinstance(data["step"], int) and not isinstance(data["step"], bool)
    if "phase" in data:  # Codex's started/updated items carry no step: not one yet
        return False
    return etype in CLAUDE_STEP_TYPES


def clip(value: Any, cap: int = TEXT_CAP) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= cap else text[:cap] + "…"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass
class Meters:
    """The budget counters as the log shows them, sampled over time."""

    values: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    points: list[list[float]] = field(default_factory=list)
    stride: int = 1
    _pending: int = 0

    def bump(self, ts: float, counter: str, amount: int) -> None:
        if amount <= 0:
            return
        self.values[counter] += amount
        self._pending += 1
        if self._pending >= self.stride:
            self._pending = 0
            self.points.append([ts, *(self.values[c] for c in COUNTERS)])
            if len(self.points) > 2 * SERIES_POINTS:
                self.points = self.points[::2]
                self.stride *= 2

    def series(self, last_ts: float | None) -> list[list[float]]:
        now = [last_ts, *(self.values[c] for c in COUNTERS)] if last_ts is not None else None
        if now is not None and (not self.points or self.points[-1] != now):
            return [*self.points, now]
        return list(self.points)


class LogIndex:
    def __init__(self, path: Path, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self.lock = threading.Lock()
        self._reset(None)

    def _reset(self, inode: int | None) -> None:
        self.inode = inode
        self.offset = 0  # the byte after the last complete line indexed
        self.size = 0
        self.lines = 0
        self.page_offsets = [0]
        self.check = ChainCheck(self.run_id)
        self.by_category: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()
        self.refusals: list[dict[str, Any]] = []
        self.refusal_count = 0
        self.models: Counter[str] = Counter()
        self.agent_models: Counter[str] = Counter()
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.start: dict[str, Any] | None = None
        self.end: dict[str, Any] | None = None
        self.widened: list[str] = []
        self.selftest: dict[str, Any] | None = None
        self.patch: dict[str, Any] | None = None
        self.requests = 0
        self.latency_ms = 0.0
        self.unparsed = 0
        self.meters = Meters()

    @property
    def done(self) -> bool:
        return self.offset >= self.size

    def refresh(self, budget: int = SCAN_BUDGET) -> None:
        """Index what was appended since the last call, up to `budget` bytes."""
        with self.lock:
            try:
                st = os.stat(self.path)
            except OSError:
                self._reset(None)
                return
            if st.st_ino != self.inode or st.st_size < self.offset:
                self._reset(st.st_ino)  # replaced or cut: start over
            self.size = st.st_size
            if self.offset >= st.st_size:
                return
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                limit = self.offset + budget
                while self.offset < limit:
                    raw = fh.readline(MAX_LINE + 1)
                    if not raw.endswith(b"\n"):
                        if len(raw) <= MAX_LINE:
                            break  # the end, or a line still being written
                        skipped = _skip_line(fh)
                        if skipped is None:
                            break
                        self._count_line()
                        self.unparsed += 1
                        self.check.unreadable(f"a line longer than {MAX_LINE >> 20} MiB "
                                              f"(not checked by the viewer)")
                        self.offset += len(raw) + skipped
                        continue
                    self._count_line()
                    self._index(raw[:-1])
                    self.offset += len(raw)

    def _count_line(self) -> None:
        if self.lines and self.lines % PAGE_LINES == 0:
            self.page_offsets.append(self.offset)
        self.lines += 1

    def _index(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.unparsed += 1
            self.check.feed(raw)  # reported as not a JSON line
            return
        self.check.feed(raw, event)
        etype = event.get("type")
        source = event.get("source")
        data = event.get("data")
        ts = event.get("ts")
        if not isinstance(etype, str) or not isinstance(source, str) or not isinstance(data, dict):
            self.unparsed += 1
            return
        if isinstance(ts, int | float) and not isinstance(ts, bool):
            ts = float(ts)
            if self.first_ts is None:
                self.first_ts = ts
            self.last_ts = ts
        else:
            ts = self.last_ts or 0.0
        cat = category(etype, source)
        self.by_category[cat] += 1
        if etype in self.by_type or len(self.by_type) < MAX_TYPES:
            self.by_type[etype] += 1
        trusted = source in TRUSTED_SOURCES
        if cat == "refusal":
            self.refusal_count += 1
            if len(self.refusals) < MAX_REFUSALS:
                what = (data.get("target") or data.get("tool") or data.get("model")
                        or data.get("path"))
                self.refusals.append({
                    "line": self.lines, "seq": event.get("seq"), "ts": ts, "type": etype,
                    "reason": clip(data.get("reason") or ""), "detail": clip(data.get("detail") or ""),
                    "what": clip(what) if what is not None else None})
        elif cat == "agent":
            if is_step(etype, data):
                self.meters.bump(ts, "steps", 1)
            if etype == "agent.output" and isinstance(data.get("text"), str):
                self.meters.bump(ts, "output_bytes", len(data["text"].encode("utf-8", "replace")))
            elif etype == "agent.start" and isinstance(data.get("model"), str):
                self._note_model(self.agent_models, data["model"])
        if not trusted:
            return
        if etype == "provider.request":
            self.requests += 1
            self.meters.bump(ts, "requests", 1)
            self.latency_ms += float(data.get("latency_ms") or 0)
            tokens = _int(data.get("input_tokens")) + _int(data.get("output_tokens"))
            self.meters.bump(ts, "tokens", tokens)
            if isinstance(data.get("model"), str):
                self._note_model(self.models, data["model"])
        elif etype == "mcp.call":
            self.meters.bump(ts, "mcp_calls", 1)
        elif etype == "run.start" and self.start is None:
            self.start = {k: clip(data.get(k)) for k in
                          ("agent", "policy", "policy_digest", "runtime", "gvisor_platform",
                           "network", "workspace_mode") if data.get(k) is not None}
            task = data.get("task")
            if isinstance(task, list) and all(isinstance(t, str) for t in task):
                task = " ".join(task)
            self.start["task"] = clip(task, 1000)
        elif etype == "run.end":
            self.end = {k: data.get(k) for k in ("status", "exit_code", "exit_reason", "duration_s")}
        elif etype == "policy.widened" and len(self.widened) < MAX_WIDENED:
            self.widened.append(clip(data.get("detail"), 500))
        elif etype == "selftest":
            checks = data.get("checks")
            checks = checks if isinstance(checks, list) else []
            self.selftest = {"ok": bool(data.get("ok")), "runtime": clip(data.get("runtime")),
                             "checks": [{"name": clip(c.get("name")), "ok": bool(c.get("ok")),
                                         "detail": clip(c.get("detail"))}
                                        for c in checks[:100] if isinstance(c, dict)]}
        elif etype == "log.suppressed" and isinstance(data.get("refusals"), dict):
            # Refusals past the log's per-kind cap are counted here, not written one by one.
            self.refusal_count += sum(_int(n) for n in data["refusals"].values())
        elif etype == "workspace.patch":
            self.patch = {"bytes": _int(data.get("bytes"))}

    @staticmethod
    def _note_model(counter: Counter[str], model: str) -> None:
        model = clip(model, 200)
        if model in counter or len(counter) < MAX_MODELS:
            counter[model] += 1

    def verification(self, report: dict[str, Any] | None) -> dict[str, Any]:
        """The chain's state: intact, broken (with the first wrong line), or not known yet."""
        if not self.done:
            if self.check.problem is not None:
                return {"state": "broken", "line": self.check.problem[0],
                        "message": self.check.problem[1]}
            return {"state": "checking", "line": None, "message": None}
        if report is None:
            # Still being written (or its host died): what is there so far is checked,
            # a partly written last line is not a fault yet.
            problem = self.check.problem
            if problem is None:
                return {"state": "running", "line": None, "message": None}
            return {"state": "broken", "line": problem[0], "message": problem[1]}
        problem = self.check.finish(torn_tail=self.size > self.offset, report=report)
        if problem is None:
            return {"state": "intact", "line": None, "message": None}
        return {"state": "broken", "line": problem[0], "message": problem[1]}


def _skip_line(fh: Any) -> int | None:
    """Skip the rest of an overlong line; its length, or None when it has no end yet."""
    skipped = 0
    while True:
        chunk = fh.readline(1 << 20)
        if not chunk:
            return None
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            return skipped


# -- reading lines for the timeline ----------------------------------------------------------

LINE_SHOWN = 64 << 10  # bytes of one line sent to the page; longer lines arrive cut
RESPONSE_BYTES = 4 << 20  # bytes of lines per response
FILTER_SCAN = 16 << 20  # bytes a filtered or searched read looks through per request


@dataclass
class Line:
    line: int
    offset: int
    size: int
    text: str | None  # None when the line was longer than LINE_SHOWN


def read_lines(path: Path, offset: int, first_line: int, *, limit: int,
               scan: int = FILTER_SCAN) -> Iterator[Line]:
    """Complete lines from `offset`, numbered from `first_line`, at most `scan` bytes."""
    with path.open("rb") as fh:
        fh.seek(offset)
        n, pos, end = first_line, offset, offset + scan
        count = 0
        while count < limit and pos < end:
            raw = fh.readline(LINE_SHOWN + 1)
            if not raw:
                return
            if raw.endswith(b"\n"):
                yield Line(n, pos, len(raw), raw[:-1].decode("utf-8", "replace"))
                pos += len(raw)
            else:
                if len(raw) <= LINE_SHOWN:
                    return  # a line still being written
                rest = _skip_line(fh)
                if rest is None:
                    return
                yield Line(n, pos, len(raw) + rest, None)
                pos += len(raw) + rest
            n += 1
            count += 1
