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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


class EventSink:
    """What services need to record events: `emit(type, source, **data)`."""

    def emit(self, type: str, source: Source, **data: Any) -> Event:  # pragma: no cover
        raise NotImplementedError


class EventLog(EventSink):
    def __init__(self, path: Path | None, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = genesis_hash(run_id)
        self._listeners: list[Listener] = []
        self._fh = None
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

    def emit(self, type: str, source: Source, **data: Any) -> Event:
        with self._lock:
            self._seq += 1
            event = Event(self._seq, round(time.time(), 6), self.run_id, type, source,
                          self._prev, data)
            line = json.dumps(event.to_dict(), separators=(",", ":"), default=str,
                              ensure_ascii=False).encode()
            if self._fh is not None:
                self._fh.write(line + b"\n")
            self._prev = line_hash(line)
            listeners = list(self._listeners)
        for listener in listeners:
            with contextlib.suppress(Exception):  # a broken console must not break the run
                listener(event)
        return event

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                try:
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
