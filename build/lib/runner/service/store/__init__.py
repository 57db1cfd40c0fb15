"""The service's database: run records, the shared queue, host leases and usage.

    store = open_store("sqlite:////var/lib/airlock/airlock.db")   # or postgresql://...
    run = store.create_run("acme", {"agent": "command", "command": ["true"]}, quota=Quota(queued=20))
    claimed = store.claim_next("host-a", weights={"acme": 1}, concurrent={"acme": 4})
"""

from runner.service.store.base import (
    ACTIVE,
    ENDED,
    STATUSES,
    HostRecord,
    Quota,
    QuotaExceeded,
    RunRecord,
    RunStatus,
    Store,
    StoreError,
)
from runner.service.store.sql import SqlStore, new_run_id, open_store

__all__ = ["ACTIVE", "ENDED", "STATUSES", "HostRecord", "Quota", "QuotaExceeded", "RunRecord",
           "RunStatus", "SqlStore", "Store", "StoreError", "new_run_id", "open_store"]
