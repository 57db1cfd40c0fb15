"""Budgets counted from authoritative events and enforced by the host.

Counters are charged by the services that see the real traffic (the gateway charges
requests and tokens, the MCP server charges calls, the orchestrator charges output
bytes and agent steps). The first counter to go past its limit trips the budget: it
records one `budget.exceeded` event and calls `on_exceeded`, which ends the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

from runner.events.log import EventSink, Source

Counter = Literal["steps", "requests", "tokens", "mcp_calls", "output_bytes"]
COUNTERS: tuple[Counter, ...] = ("steps", "requests", "tokens", "mcp_calls", "output_bytes")


class BudgetExceeded(Exception):
    def __init__(self, counter: str, used: int, limit: int) -> None:
        super().__init__(f"budget {counter} exceeded: {used} > {limit}")
        self.counter, self.used, self.limit = counter, used, limit


class Budgets:
    def __init__(
        self,
        limits: dict[str, int | None],
        sink: EventSink | None = None,
        on_exceeded: Callable[[BudgetExceeded], None] | None = None,
    ) -> None:
        self.limits = {k: v for k, v in limits.items() if v is not None}
        self.used: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.sink = sink
        self.on_exceeded = on_exceeded
        self.tripped: BudgetExceeded | None = None
        self._lock = threading.Lock()

    def remaining(self, counter: str) -> int | None:
        limit = self.limits.get(counter)
        return None if limit is None else max(0, limit - self.used.get(counter, 0))

    def would_exceed(self, counter: str, amount: int = 1) -> bool:
        limit = self.limits.get(counter)
        with self._lock:
            return self.tripped is not None or (
                limit is not None and self.used.get(counter, 0) + amount > limit
            )

    def charge(self, counter: str, amount: int = 1, source: Source = "host") -> bool:
        """Add `amount`; return False (and trip the budget once) when past the limit."""
        trip = None
        with self._lock:
            self.used[counter] = self.used.get(counter, 0) + amount
            limit = self.limits.get(counter)
            if limit is not None and self.used[counter] > limit and self.tripped is None:
                trip = self.tripped = BudgetExceeded(counter, self.used[counter], limit)
        if trip is not None:
            if self.sink is not None:
                self.sink.emit("budget.exceeded", source, counter=counter, used=trip.used,
                               limit=trip.limit)
            if self.on_exceeded is not None:
                self.on_exceeded(trip)
            return False
        return self.tripped is None

    def snapshot(self) -> dict[str, dict[str, int | None]]:
        with self._lock:
            return {c: {"used": self.used.get(c, 0), "limit": self.limits.get(c)}
                    for c in COUNTERS}
