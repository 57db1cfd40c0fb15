"""What one run used: counted from its authoritative events and the engine's own stats.

Provider requests and tokens come from the gateway's `provider.request` events (the
same counts its budgets charge), MCP calls from the MCP server's `mcp.call`, egress
bytes from the proxy's `proxy.closed`; CPU seconds and peak memory from the engine's
stats API (`docker stats`), sampled while the sandbox runs: the Engine API hides
whether the host has cgroup v1 or v2, and files under /sys/fs/cgroup would not.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from runner.engines.base import Engine
from runner.events.log import Event

SAMPLE_INTERVAL = 1.0


class RunMeter:
    """A listener on one run's events; `counters()` is the run's usage so far."""

    def __init__(self, engine: Engine | None, interval: float = SAMPLE_INTERVAL) -> None:
        self._engine = engine
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self.container: str | None = None
        self.on_container: list[Any] = []
        self._t0: float | None = None
        self._t1: float | None = None
        self.c: dict[str, float] = {
            "provider_requests": 0, "input_tokens": 0, "output_tokens": 0, "tokens": 0,
            "mcp_calls": 0, "egress_bytes": 0, "provider_bytes": 0, "cpu_seconds": 0.0,
            "peak_memory_bytes": 0,
        }

    # -- events ---------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        if not event.trusted:
            return  # the agent's own claims are never billed or believed
        t, d = event.type, event.data
        if t == "provider.request":
            inp = _num(d.get("input_tokens"))
            out = _num(d.get("output_tokens"))
            with self._lock:
                self.c["provider_requests"] += 1
                self.c["input_tokens"] += inp
                self.c["output_tokens"] += out
                self.c["tokens"] += inp + out
                self.c["provider_bytes"] += _num(d.get("bytes_in")) + _num(d.get("bytes_out"))
                if "cost_usd" in d:  # only where the policy gives the model a price
                    self.c["cost_usd"] = self.c.get("cost_usd", 0.0) + _num(d.get("cost_usd"))
        elif t == "mcp.call":
            with self._lock:
                self.c["mcp_calls"] += 1
        elif t == "proxy.closed":
            with self._lock:
                self.c["egress_bytes"] += _num(d.get("bytes_up")) + _num(d.get("bytes_down"))
        elif t in ("sandbox.created", "sandbox.claimed"):  # cold, or from a warm pool
            self.container = str(d.get("container") or "") or None
            for hook in self.on_container:
                hook(self.container)
        elif t == "sandbox.started":
            self._t0 = time.monotonic()
            self._start_sampler()
        elif t == "sandbox.exited":
            self._t1 = time.monotonic()
            self._stop.set()

    # -- the engine's stats -----------------------------------------------------------

    def _start_sampler(self) -> None:
        if self._engine is None or self.container is None:
            return
        self._sampler = threading.Thread(target=self._sample, name="airlock-stats", daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        assert self._engine is not None and self.container is not None
        while True:
            try:
                s = self._engine.stats(self.container)
            except Exception:
                s = None
            if s is not None:
                with self._lock:
                    # CPU time only grows: a late sample of a dying container reads lower.
                    self.c["cpu_seconds"] = max(self.c["cpu_seconds"], round(s.cpu_seconds, 3))
                    self.c["peak_memory_bytes"] = max(self.c["peak_memory_bytes"], s.memory_bytes,
                                                      s.memory_peak or 0)
            if self._stop.wait(self._interval):
                return

    def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)

    # -- results ----------------------------------------------------------------------

    def counters(self, wall_seconds: float | None = None) -> dict[str, float]:
        with self._lock:
            out = dict(self.c)
        if wall_seconds is None and self._t0 is not None:
            wall_seconds = (self._t1 or time.monotonic()) - self._t0
        out["wall_seconds"] = round(wall_seconds or 0.0, 3)
        return out


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0
