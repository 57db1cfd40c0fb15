"""Where the viewer finds runs: sources scoped to what a caller may see.

A `RunSource` names runs and gives the directory of each (its `events.jsonl`,
`report.json`, `policy.json`, `changes.patch`). The viewer asks, for every request,
which source that caller may see: `airlock view` has one, the `runs/` directory; a
service has one per tenant (its own runs) and one for the operator (everyone's). A run
outside the caller's source answers 404, exactly as a run that does not exist.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

# Run ids as the orchestrator makes them (20261205-170708-c51abe), with room for other
# sources' ids; never a path separator or a leading dot.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RunSource(Protocol):
    def run_ids(self) -> Iterable[str]:
        """Ids of the runs this source holds, newest first."""

    def run_dir(self, run_id: str) -> Path | None:
        """The run's directory, or None when this source has no such run."""


def _valid(name: str) -> bool:
    return bool(RUN_ID.match(name)) and ".." not in name


class LocalRuns:
    """A `runs/` directory: one sub-directory per run, named by its id."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_ids(self) -> list[str]:
        try:
            names = [e.name for e in self.root.iterdir() if _valid(e.name) and e.is_dir()]
        except OSError:
            return []
        # Ids begin with their start time, so the newest sort last.
        return sorted(names, reverse=True)

    def run_dir(self, run_id: str) -> Path | None:
        if not _valid(run_id):
            return None
        path = self.root / run_id
        return path if path.is_dir() else None


class TenantRuns:
    """A service's runs directory, one sub-directory per tenant: `<root>/<tenant>/<run>`.

    `of(tenant)` is what that tenant sees (its own directory only, so no id of another
    tenant's can resolve); `everyone()` is the operator's view.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def of(self, tenant: str) -> RunSource:
        if not _valid(tenant):
            raise ValueError(f"not a tenant name: {tenant!r}")
        return LocalRuns(self.root / tenant)

    def everyone(self) -> RunSource:
        return _AllTenants(self)

    def tenants(self) -> list[str]:
        try:
            return sorted(e.name for e in self.root.iterdir() if _valid(e.name) and e.is_dir())
        except OSError:
            return []


class _AllTenants:
    def __init__(self, runs: TenantRuns) -> None:
        self.runs = runs

    def run_ids(self) -> Iterator[str]:
        per_tenant = [self.runs.of(t).run_ids() for t in self.runs.tenants()]
        return heapq.merge(*per_tenant, reverse=True)

    def run_dir(self, run_id: str) -> Path | None:
        for tenant in self.runs.tenants():
            found = self.runs.of(tenant).run_dir(run_id)
            if found is not None:
                return found
        return None


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    scheme, _, value = (header or "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None
