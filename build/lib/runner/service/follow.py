"""A run's event log, followed as it grows, until the run has ended.

The log is the orchestrator's `events.jsonl`, flushed per event; only complete lines are
sent (a line being written is picked up on the next look). The stream ends once the
store says the run ended and the file has nothing more: the run's last event
(`run.end`) is written before the store hears of the end, so nothing is cut off.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

POLL = 0.1
READ_CHUNK = 1 << 16
MAX_LINE = 1 << 22  # an event line the orchestrator writes is far below this


async def follow_lines(path_of: Callable[[], Path | None], ended: Callable[[], bool],
                       *, after_seq: int = 0, poll: float = POLL) -> AsyncIterator[bytes]:
    """Complete lines of the log (without the newline), from the first after `after_seq`.

    `path_of` gives the log's path once the run has one (a queued run has none yet);
    `ended` says whether the run has ended. Both are called between reads, so they
    should be cheap or run off the event loop by the caller.
    """
    fh = None
    buf = b""
    try:
        while True:
            if fh is None:
                path = path_of()
                if path is not None:
                    try:
                        fh = open(path, "rb")  # noqa: SIM115 - held across awaits
                    except FileNotFoundError:
                        fh = None
            got = False
            if fh is not None:
                chunk = fh.read(READ_CHUNK)
                if chunk:
                    got = True
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    if len(buf) > MAX_LINE:
                        buf = b""
                    for line in lines:
                        if after_seq and _seq(line) <= after_seq:
                            continue
                        yield line
            if got:
                continue
            if await asyncio.to_thread(ended):
                # One more read: the end may have come between the read and the question.
                if fh is not None:
                    rest = buf + fh.read()
                    for line in rest.split(b"\n"):
                        if line and (not after_seq or _seq(line) > after_seq) and _complete(line):
                            yield line
                return
            await asyncio.sleep(poll)
    finally:
        if fh is not None:
            fh.close()


def _seq(line: bytes) -> int:
    try:
        return int(json.loads(line).get("seq", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def _complete(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def sse(line: bytes) -> bytes:
    """One event in `text/event-stream` framing: its seq as the id, its type as the event."""
    try:
        event = json.loads(line)
        kind = re.sub(r"[^A-Za-z0-9._-]", "_", str(event.get("type", "event")))[:100]
        head = f"id: {int(event.get('seq', 0))}\nevent: {kind}\n".encode()
    except (ValueError, AttributeError, TypeError):
        head = b""
    return head + b"data: " + line + b"\n\n"


def readable(path: Path) -> bool:
    return os.access(path, os.R_OK)
