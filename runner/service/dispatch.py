"""This host's side of the shared queue: claim runs while there is capacity, run them,
record how they ended.

One loop thread drives everything that touches the queue: the lease (heartbeat), other
hosts' expiry, claims in the store's weighted fair order, cancellations asked for on any
host, and live usage. Runs themselves go on in their own threads (`Execution`); their
end wakes the loop, so a freed slot is taken at once rather than at the next tick.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.engines.base import Engine
from runner.run.pool import Pool
from runner.service.config import Config
from runner.service.executor import Execution
from runner.service.store import RunRecord, Store
from runner.service.store.base import PEAK_PREFIX

log = logging.getLogger("airlock.service")

TICK = 0.5  # the loop's longest sleep when nothing wakes it
USAGE_FLUSH = 2.0  # live usage (tokens toward today's quota) reaches the store this often


def _today() -> Any:
    return datetime.now(UTC).date()


class Dispatcher:
    def __init__(self, config: Config, store: Store, engine: Engine | None, host_id: str,
                 *, host_addresses: list[str] | None = None, address: str | None = None,
                 on_end: Callable[[RunRecord | None, Execution], None] | None = None,
                 pool: Pool | None = None) -> None:
        self.config = config
        self.pool = pool
        self.store = store
        self.engine = engine
        self.host_id = host_id
        self.address = address
        self.capacity = config.capacity
        self.draining = False
        self.drained = False
        self._drain_lock = threading.Lock()
        self._host_addresses = host_addresses or []
        self._on_end_hook = on_end
        self._local: dict[str, Execution] = {}
        self._flushed: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="airlock-dispatch", daemon=True)
        self._last_beat = 0.0
        self._last_expire = 0.0
        self._last_flush = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.store.heartbeat(self.host_id, self.config.lease_ttl, address=self.address)
        self._last_beat = time.monotonic()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def running(self) -> int:
        with self._lock:
            return len(self._local)

    def local(self, run_id: str) -> Execution | None:
        with self._lock:
            return self._local.get(run_id)

    def cancel_local(self, run_id: str) -> bool:
        ex = self.local(run_id)
        if ex is None:
            return False
        ex.cancel()
        return True

    def drain(self, grace: float, *, hurry: threading.Event | None = None,
              after_cancel: float = 60.0) -> None:
        """Take no new runs; let running ones end within `grace`, then cancel them.

        Queued runs stay queued in the store (another host, or this one restarted,
        takes them); every run that was running here ends with its record written.
        """
        with self._drain_lock:
            if self.drained:
                return
            self._drain(grace, hurry, after_cancel)
            self.drained = True

    def _drain(self, grace: float, hurry: threading.Event | None, after_cancel: float) -> None:
        self.draining = True
        self.wake()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            time.sleep(0.1)
        with self._lock:
            left = list(self._local.values())
        for ex in left:
            log.warning("drain: cancelling run %s after the grace period", ex.run_id)
            ex.cancel()
        deadline = time.monotonic() + after_cancel
        for ex in left:
            ex.thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.store.leave(self.host_id)

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:  # the database went away for a moment: try again
                log.error("dispatch: %s: %s", type(exc).__name__, exc)
                self._stop.wait(1.0)
            self._wake.wait(TICK)
            self._wake.clear()

    def _turn(self) -> None:
        now = time.monotonic()
        ttl = self.config.lease_ttl
        if now - self._last_beat >= ttl / 3:
            alive = self.store.heartbeat(self.host_id, ttl, address=self.address)
            self._last_beat = now
            if not alive:
                # Our lease ran out (a stall, a partition): other hosts have marked our
                # runs lost. Stop them; their real end still gets recorded.
                log.error("dispatch: this host's lease had expired; ending its runs")
                with self._lock:
                    for ex in self._local.values():
                        ex.cancel()
        if now - self._last_expire >= ttl / 2:
            self._last_expire = now
            lost = self.store.expire_dead_hosts()
            if lost:
                log.warning("dispatch: %d run(s) of dead hosts marked lost", len(lost))
        # Claims first: a run submitted a moment ago is what the wake-up was for.
        while not self.draining and not self._stop.is_set() and self.running < self.capacity:
            record = self.store.claim_next(
                self.host_id,
                weights={n: t.weight for n, t in self.config.tenants.items()},
                concurrent={n: t.quota.concurrent for n, t in self.config.tenants.items()})
            if record is None:
                break
            self._launch(record)
        self._check_cancels()
        if now - self._last_flush >= USAGE_FLUSH:
            self._last_flush = now
            self._flush_usage()

    def _check_cancels(self) -> None:
        with self._lock:
            if not self._local:
                return
        # Only this host's running runs are read (the list stays as short as its
        # capacity); a local run missing from it was ended by someone else: another
        # host marked it lost, say.
        running = {r.id: r for r in self.store.runs_of_host(self.host_id, ["running"])}
        with self._lock:
            local = list(self._local.values())
        for ex in local:
            rec = running.get(ex.run_id)
            if (rec is None or rec.cancel_requested) and not ex.cancelled and ex.result is None:
                ex.cancel()

    def _flush_usage(self) -> None:
        with self._lock:
            local = list(self._local.values())
        for ex in local:
            now = ex.meter.counters()
            before = self._flushed.get(ex.run_id, {})
            delta = {}
            for k, v in now.items():
                if k.startswith(PEAK_PREFIX):
                    if v > before.get(k, 0):
                        delta[k] = v
                elif v > before.get(k, 0):
                    delta[k] = v - before.get(k, 0)
            if delta:
                self.store.add_usage(ex.tenant.name, ex.run_id, delta)
                self._flushed[ex.run_id] = now

    def _launch(self, record: RunRecord) -> None:
        tenant = self.config.tenants.get(record.tenant)
        if tenant is None:
            self.store.finish(record.id, "failed", None, "tenant_removed")
            return
        tokens_left = None
        if tenant.quota.tokens_per_day is not None:
            used = self.store.usage(tenant.name, since=_today()).get("tokens", 0.0)
            tokens_left = tenant.quota.tokens_per_day - used
        ex = Execution(
            run_id=record.id, tenant=tenant, request=record.request,
            runs_dir=self.config.runs_dir, engine=self.engine,
            host_addresses=self._host_addresses, tokens_left=tokens_left,
            on_container=self._started, on_end=self._ended, pool=self.pool)
        with self._lock:
            self._local[record.id] = ex
        if record.cancel_requested:
            ex.cancel()
        ex.start()

    def _started(self, run_id: str, run_dir: str, container: str | None) -> None:
        # Called from the run's own thread between creating and starting its sandbox:
        # the database write goes on beside the start, not before it.
        threading.Thread(target=self._record_start, args=(run_id, run_dir, container),
                         name="airlock-mark-started", daemon=True).start()

    def _record_start(self, run_id: str, run_dir: str, container: str | None) -> None:
        try:
            self.store.mark_started(run_id, self.host_id, run_dir=run_dir, container=container)
        except Exception as exc:
            log.error("dispatch: run %s started, but the store did not hear: %s", run_id, exc)

    def _ended(self, ex: Execution) -> None:
        status, code, reason, usage = ex.outcome()
        usage["runs"] = 1
        record = None
        try:
            record = self.store.finish(ex.run_id, status, code, reason, usage)
        except Exception as exc:
            log.error("dispatch: run %s ended (%s) but the store refused it: %s",
                      ex.run_id, status, exc)
        finally:
            with self._lock:
                self._local.pop(ex.run_id, None)
                self._flushed.pop(ex.run_id, None)
            self.wake()
        if self._on_end_hook is not None:
            with contextlib.suppress(Exception):
                self._on_end_hook(record, ex)


def default_host_id(config: Config) -> str:
    import hashlib
    import socket

    # Stable across restarts (a restarted host finds its own unfinished runs), distinct
    # for two services on one machine with different run directories.
    digest = hashlib.sha256(str(Path(config.runs_dir)).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"
