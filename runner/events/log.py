"""One ordered, hash-chained JSONL log per run.

Each line carries `prev`, the SHA-256 of the previous line's bytes (the first line's
`prev` is derived from the run id), so an edited, removed, inserted or reordered line
breaks the chain. Lines are written and flushed one at a time under a lock: the
gateway and MCP server emit from their own threads, and a crash of the host process
leaves a valid prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from runner.events.clip import clip

Source = Literal["host", "gateway", "proxy", "mcp", "agent"]
TRUSTED_SOURCES = frozenset({"host", "gateway", "proxy", "mcp"})


def genesis_hash(run_id: str) -> str:
    return hashlib.sha256(f"airlock-run:{run_id}".encode()).hexdigest()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    run_id: str
    type: str
    source: str
    prev: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "run_id": self.run_id,
            "type": self.type,
            "source": self.source,
            "prev": self.prev,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(d["seq"], d["ts"], d["run_id"], d["type"], d["source"], d["prev"],
                   d.get("data") or {})

    @property
    def trusted(self) -> bool:
        return self.source in TRUSTED_SOURCES


Listener = Callable[[Event], None]
# Called once when the log stops taking events (its size cap, or the disk refusing a
# write): the run must end, since what happens next would go unrecorded.
OnFull = Callable[[str], None]

DEFAULT_MAX_BYTES = 64 << 20
# Room kept past the cap for the host's own closing events (sandbox exit, removal,
# the summary of what was dropped, run.end), so a capped log still ends properly.
CLOSING_RESERVE = 256 << 10
# One event's line: past this its data is clipped (see runner/events/clip.py).
MAX_EVENT_BYTES = 256 << 10
# Refusals of one kind written before further ones are only counted (see `refusal`).
REFUSAL_CAP = 100


class EventSink:
    """What services need to record events: `emit(type, source, **data)`, and for attempts
    the run refused, `refusal(type, source, **data)` (clipped, capped per kind)."""

    # `type` and `source` are positional-only: data may use any key (even "type" or
    # "self") without clashing with them; it stays under the event's own `data` key.
    def emit(self, type: str, source: Source, /, **data: Any) -> Event | None:  # pragma: no cover
        raise NotImplementedError

    def refusal(self, type: str, source: Source, /, *, kind: str | None = None,
                **data: Any) -> Event | None:
        return self.emit(type, source, **clip(data))


def _fallback(value: Any) -> Any:
    """json.dumps' `default`: anything it cannot write becomes a short description."""
    try:
        return clip(value if isinstance(value, bytes | bytearray) else str(value))
    except Exception:
        return f"[{type(value).__name__}]"


def serialize(record: dict[str, Any], *, ascii: bool = False) -> bytes:
    """One JSON line for `record`; never fails.

    Text is written as UTF-8 where it can be; a string that cannot be UTF-8 (a lone
    surrogate, which an agent can send as a JSON escape) makes the line ASCII with
    escapes, which reads back to the very same string. Values JSON cannot hold (cycles,
    non-string keys, NaN) are clipped to plain ones. `ascii`: escape all non-ASCII (for
    a terminal, where a bidi override or a C1 control would act).
    """
    try:
        text = json.dumps(record, separators=(",", ":"), default=_fallback,
                          ensure_ascii=ascii, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        record = {**record, "data": clip(record.get("data"), 4096)}
        text = json.dumps(record, separators=(",", ":"), default=_fallback,
                          ensure_ascii=ascii, allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":"), default=_fallback,
                          ensure_ascii=True, allow_nan=False).encode()


class EventLog(EventSink):
    """The run's log. `max_bytes` caps the file: past it events are counted, not written
    (only the host's own closing events still are, within CLOSING_RESERVE), one `log.cap`
    event says so and `on_full` is called to end the run. A write the disk refuses is
    undone (the file is cut back to its last whole line) and consumes no sequence number."""

    def __init__(self, path: Path | None, run_id: str, *, max_bytes: int | None = None,
                 on_full: OnFull | None = None, refusal_cap: int = REFUSAL_CAP) -> None:
        self.path = path
        self.run_id = run_id
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.refusal_cap = refusal_cap
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = genesis_hash(run_id)
        self._size = 0
        self._listeners: list[Listener] = []
        self._fh: Any = None
        self._closed = False  # a late emit (a thread the run left) is not an event of it
        self.full: str | None = None  # why the log stopped taking events: "cap" | "write"
        self.dropped = 0  # events not written (past the cap, or refused by the disk)
        self._refusals: Counter[tuple[str, str]] = Counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            self._fh = os.fdopen(fd, "ab", buffering=0)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def last_hash(self) -> str:
        return self._prev

    @property
    def count(self) -> int:
        return self._seq

    @property
    def size(self) -> int:
        return self._size

    @property
    def suppressed(self) -> dict[str, int]:
        """Refusals only counted, past the cap, per `type:kind`."""
        with self._lock:
            return {f"{t}:{k}": n - self.refusal_cap for (t, k), n in self._refusals.items()
                    if n > self.refusal_cap}

    def emit(self, type: str, source: Source, /, **data: Any) -> Event | None:
        """Write one event; None when it was not written (counted in `dropped`)."""
        full: str | None = None
        with self._lock:
            event, full = self._append(type, source, data)
            listeners = list(self._listeners) if event is not None else []
        if full is not None and self.on_full is not None:
            with contextlib.suppress(Exception):
                self.on_full(full)
        for listener in listeners:
            with contextlib.suppress(Exception):  # a broken console must not break the run
                listener(event)  # type: ignore[arg-type]
        return event

    def refusal(self, type: str, source: Source, /, *, kind: str | None = None,
                **data: Any) -> Event | None:
        """Record an attempt the run refused: its data clipped (it is the sandbox's), and
        past `refusal_cap` of the same type and kind (default: its `reason`) only counted;
        `write_suppressed()` records how many were."""
        key = (type, str(kind if kind is not None else data.get("reason", "")))
        with self._lock:
            self._refusals[key] += 1
            if self._refusals[key] > self.refusal_cap:
                return None
        return self.emit(type, source, **clip(data))

    def write_suppressed(self) -> Event | None:
        """One `log.suppressed` event with the refusals only counted, if there were any."""
        counts = self.suppressed
        if not counts:
            return None
        return self.emit("log.suppressed", "host", refusals=counts, cap=self.refusal_cap)

    def _append(self, type: str, source: Source, data: dict[str, Any]
                ) -> tuple[Event | None, str | None]:
        """Under the lock: serialize and write; the new event (None if not written), and
        the reason the log just became full (once)."""
        if self._closed:
            return None, None
        # Once full, only the host's own (closing) events are still written.
        if self.full is not None and source != "host":
            self.dropped += 1
            return None, None
        event = self._event(type, source, data)
        line = serialize(event.to_dict())
        if len(line) > MAX_EVENT_BYTES:
            event = self._event(type, source, {"clipped_bytes": len(line),
                                               **clip(data, 2048, items=16)})
            line = serialize(event.to_dict())
        if self._fh is None:
            self._advance(line)
            return event, None
        newly_full = None
        if self.max_bytes is not None and self.full is None \
                and self._size + len(line) + 1 > self.max_bytes:
            self.full = newly_full = "cap"
            self._write(serialize(self._event(
                "log.cap", "host", {"max_bytes": self.max_bytes, "size": self._size,
                                    "dropped": type}).to_dict()))
            if source != "host":
                self.dropped += 1
                return None, newly_full
            event = self._event(type, source, event.data)
            line = serialize(event.to_dict())
        if self.max_bytes is not None and self.full is not None \
                and self._size + len(line) + 1 > self.max_bytes + CLOSING_RESERVE:
            self.dropped += 1
            return None, newly_full
        error = self._write(line)
        if error is not None:
            self.dropped += 1
            if self.full is None:
                self.full = "write"
                newly_full = f"write: {error}"
            return None, newly_full
        return event, newly_full

    def _event(self, type: str, source: Source, data: dict[str, Any]) -> Event:
        return Event(self._seq + 1, round(time.time(), 6), self.run_id, type, source,
                     self._prev, data)

    def _advance(self, line: bytes) -> None:
        self._seq += 1
        self._prev = line_hash(line)

    def _write(self, line: bytes) -> str | None:
        """Append one line; on failure cut the file back and return why (nothing advances)."""
        data = memoryview(line + b"\n")
        try:
            while data:  # a write may be short (a size limit, a full disk): finish or fail
                data = data[os.write(self._fh.fileno(), data):]
        except OSError as exc:
            # A short write leaves part of a line: cut the file back to its last whole line
            # so that the next event follows a valid prefix.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fh.fileno(), self._size)
            return exc.strerror or str(exc)
        self._size += len(line) + 1
        self._advance(line)
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fh is not None:
                try:
                    with contextlib.suppress(OSError):
                        os.fsync(self._fh.fileno())
                finally:
                    self._fh.close()
                    self._fh = None


def read_events(path: Path) -> list[Event]:
    """Complete, parseable lines only (a torn last line is skipped)."""
    out = []
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                out.append(Event.from_dict(json.loads(raw)))
            except (ValueError, KeyError):
                break
    return out
