"""What the service asks of its database: run records, the shared queue, host leases, usage.

The service codes against `Store`; `open_store(url)` gives the SQL implementation for
SQLite (one host) or PostgreSQL (several hosts sharing one queue).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final, Literal

RunStatus = Literal["queued", "running", "succeeded", "failed", "budget", "timeout",
                    "cancelled", "lost"]
STATUSES: Final[tuple[str, ...]] = ("queued", "running", "succeeded", "failed", "budget",
                                     "timeout", "cancelled", "lost")
ACTIVE: Final[frozenset[str]] = frozenset({"queued", "running"})
ENDED: Final[frozenset[str]] = frozenset(STATUSES) - ACTIVE

# Usage counters summed per run and per tenant-day; names starting with "peak_" keep the
# largest value instead (peak memory is not additive).
PEAK_PREFIX: Final = "peak_"
TOKENS: Final = "tokens"


class StoreError(Exception):
    """The database could not do what was asked (unreachable, bad URL, bad state)."""


class QuotaExceeded(StoreError):
    """A tenant is over one of its quotas; the service answers 429 with Retry-After."""

    def __init__(self, which: str, limit: int, retry_after_s: int) -> None:
        super().__init__(f"quota {which} exceeded (limit {limit}); retry in {retry_after_s} s")
        self.which = which
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Quota:
    """A tenant's limits; None is no limit. `concurrent` is applied when runs are claimed
    (a tenant's extra runs wait in the queue), the others when a run is created."""

    concurrent: int | None = None
    queued: int | None = None
    runs_per_day: int | None = None
    tokens_per_day: int | None = None


@dataclass(frozen=True)
class RunRecord:
    id: str
    tenant: str
    status: str
    request: dict[str, Any]
    created_at: float
    claimed_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    host_id: str | None = None
    run_dir: str | None = None
    container: str | None = None
    exit_code: int | None = None
    exit_reason: str | None = None
    usage: dict[str, float] = field(default_factory=dict)
    cancel_requested: bool = False

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True)
class HostRecord:
    host_id: str
    address: str | None
    started_at: float
    heartbeat_at: float
    expires_at: float
    alive: bool


class Store(ABC):
    """Every call is one transaction; calls are safe from many threads and, on
    PostgreSQL, from many hosts at once."""

    url: str

    # -- runs -----------------------------------------------------------------------------

    @abstractmethod
    def create_run(self, tenant: str, request: Mapping[str, Any], *, quota: Quota,
                   run_id: str | None = None) -> RunRecord:
        """Queue a run, or raise QuotaExceeded: the checks (`queued`, `runs_per_day`,
        `tokens_per_day`) and the insert are one atomic step per tenant."""

    @abstractmethod
    def get_run(self, run_id: str, tenant: str | None = None) -> RunRecord | None:
        """The run, or None when it does not exist or belongs to another tenant."""

    @abstractmethod
    def list_runs(self, tenant: str, limit: int = 50, cursor: str | None = None,
                  statuses: Iterable[str] | None = None) -> tuple[list[RunRecord], str | None]:
        """The tenant's runs, newest first, and the cursor of the next page (or None).

        A listed record's `request` holds only its `agent`: a request is up to 1 MiB,
        and a page of 1,000 whole ones cost the service ~1.2 GB to answer."""

    @abstractmethod
    def claim_next(self, host_id: str, weights: Mapping[str, int],
                   concurrent: Mapping[str, int | None]) -> RunRecord | None:
        """Take the next queued run for this host (status -> running), in weighted fair
        order across tenants, FIFO within a tenant; None when nothing may start."""

    @abstractmethod
    def mark_started(self, run_id: str, host_id: str, *, run_dir: str | None = None,
                     container: str | None = None) -> bool:
        """Record where a claimed run lives; False if it is no longer this host's."""

    @abstractmethod
    def finish(self, run_id: str, status: str, exit_code: int | None, exit_reason: str | None,
               usage: Mapping[str, float] | None = None) -> RunRecord | None:
        """Record a run's end (an ended run keeps its first end); None if unknown."""

    @abstractmethod
    def request_cancel(self, run_id: str, tenant: str) -> RunRecord | None:
        """A queued run is cancelled at once; a running one is flagged for its host.
        None when the run does not exist for this tenant."""

    @abstractmethod
    def cancel_requested(self, run_id: str) -> bool: ...

    @abstractmethod
    def counts(self) -> dict[str, dict[str, int]]:
        """Active runs per tenant and status (queued, running), for metrics and 429s."""

    # -- hosts ----------------------------------------------------------------------------

    @abstractmethod
    def heartbeat(self, host_id: str, ttl: float, *, address: str | None = None) -> bool:
        """Renew this host's lease for `ttl` seconds. False when the lease had run out
        and this host's runs were marked `lost`: the host must end what it still runs."""

    @abstractmethod
    def expire_dead_hosts(self, now: float | None = None) -> list[str]:
        """Hosts whose lease ran out lose their runs: marked `lost`; their ids returned."""

    @abstractmethod
    def runs_of_host(self, host_id: str, statuses: Iterable[str]) -> list[RunRecord]: ...

    @abstractmethod
    def hosts(self) -> list[HostRecord]: ...

    @abstractmethod
    def leave(self, host_id: str) -> None:
        """A host that drained and stops gives its lease up."""

    # -- usage ----------------------------------------------------------------------------

    @abstractmethod
    def add_usage(self, tenant: str, run_id: str | None, counters: Mapping[str, float]) -> None:
        """Add to the run's usage and the tenant's totals for today (UTC)."""

    @abstractmethod
    def usage(self, tenant: str, since: date | None = None) -> dict[str, float]:
        """The tenant's totals since a day (inclusive, UTC), or over all time."""

    @abstractmethod
    def usage_by_day(self, tenant: str, since: date | None = None) -> dict[str, dict[str, float]]:
        """The tenant's totals per UTC day ("YYYY-MM-DD")."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
