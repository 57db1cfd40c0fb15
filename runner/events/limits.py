"""What one run may make its host-side services spend, shared by all of them.

The sandbox's own limits (memory, pids, CPU) stop at the container; the gateway and the
proxy run in the host's process and serve whatever the sandbox sends. So each run gets
one `HostLimits`:
- memory: bytes of request data its services hold at once, counted across every
  connection (a reservation is taken before the bytes are kept, and given back when the
  request is done); a reservation that does not fit is refused;
- refusals: every refused request or connection is counted; the first `refusal_events`
  of each service are logged in full, later ones only counted (one summary event at the
  end), and past `refusals` the run is ended as abusive: one `limits.exceeded` event and
  `on_exceeded`, which kills the sandbox (exit 4, reason host_limit).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from runner.events.log import EventSink, Source


class HostLimits:
    def __init__(self, *, memory: int, refusals: int, refusal_events: int,
                 sink: EventSink | None = None,
                 on_exceeded: Callable[[str], None] | None = None) -> None:
        self.memory = memory
        self.refusals = refusals
        self.refusal_events = refusal_events
        self.sink = sink
        self.on_exceeded = on_exceeded
        self.held = 0
        self.peak = 0
        self.refused: Counter[str] = Counter()  # by service
        self.suppressed: dict[str, Counter[str]] = {}  # service -> reason -> count
        self.exceeded: str | None = None
        self._lock = threading.Lock()

    # -- memory ------------------------------------------------------------------------

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.held + n > self.memory:
                return False
            self.held += n
            self.peak = max(self.peak, self.held)
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)

    # -- refusals ----------------------------------------------------------------------

    def refusal(self, service: Source, reason: str) -> bool:
        """Count one refusal; True if it is to be logged in full."""
        trip = False
        with self._lock:
            self.refused[service] += 1
            n = self.refused[service]
            total = sum(self.refused.values())
            full = n <= self.refusal_events
            if not full:
                self.suppressed.setdefault(service, Counter())[reason] += 1
            if total > self.refusals and self.exceeded is None:
                self.exceeded = "refusals"
                trip = True
        if trip:
            if self.sink is not None:
                self.sink.emit("limits.exceeded", service, limit="refusals",
                               used=total, max=self.refusals,
                               detail="the sandbox kept sending requests the host refuses")
            if self.on_exceeded is not None:
                self.on_exceeded("refusals")
        return full

    def summary(self, service: Source) -> dict[str, Any] | None:
        """What was counted but not logged for `service`, or None."""
        with self._lock:
            by_reason = self.suppressed.get(service)
            if not by_reason:
                return None
            return {"suppressed": sum(by_reason.values()), "by_reason": dict(by_reason),
                    "refused": self.refused[service]}


def unlimited() -> HostLimits:
    """For services started outside a run (the provider doctor, tests)."""
    return HostLimits(memory=1 << 62, refusals=1 << 62, refusal_events=1 << 62)
