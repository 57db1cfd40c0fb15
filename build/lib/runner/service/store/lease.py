"""A host's lease on the shared queue, renewed in the background.

Every host renews its own lease every `ttl / 3` seconds and, on the same beat, expires
the leases of hosts that stopped renewing: their running runs become `lost`. So a dead
host's runs are marked lost at most `ttl + ttl / 3` seconds after its last renewal, as
long as one host is alive. A host that finds its own lease had run out (it was stopped
long enough for the others to give it up: a frozen VM, a network partition) is told
through `on_lost`: its runs are no longer its own, and it must end them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from runner.service.store.base import Store, StoreError

log = logging.getLogger("airlock.service")
DEFAULT_TTL_S = 30.0


class HostLease:
    def __init__(self, store: Store, host_id: str, *, ttl: float = DEFAULT_TTL_S,
                 address: str | None = None, on_lost: Callable[[], None] | None = None,
                 on_expired: Callable[[list[str]], None] | None = None) -> None:
        self.store = store
        self.host_id = host_id
        self.ttl = ttl
        self.address = address
        self.on_lost = on_lost
        self.on_expired = on_expired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """One renewal and one sweep of dead hosts (the thread's step, callable in tests)."""
        if not self.store.heartbeat(self.host_id, self.ttl, address=self.address) \
                and self.on_lost is not None:
            self.on_lost()
        lost = self.store.expire_dead_hosts()
        if lost:
            log.warning("runs of hosts that stopped renewing their lease are lost: %s",
                        ", ".join(lost))
            if self.on_expired is not None:
                self.on_expired(lost)

    def start(self) -> HostLease:
        self.store.heartbeat(self.host_id, self.ttl, address=self.address)
        self._thread = threading.Thread(target=self._loop, name="airlock-lease", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.beat()
            except StoreError as exc:  # the database is away: try again on the next beat
                log.warning("lease renewal failed: %s", exc)
            except Exception:
                log.exception("lease renewal failed")

    def stop(self, *, leave: bool = True) -> None:
        """Stop renewing; with `leave`, give the lease up now (a drained host)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.ttl)
        if leave:
            try:
                self.store.leave(self.host_id)
            except StoreError as exc:
                log.warning("could not give the lease up: %s", exc)
