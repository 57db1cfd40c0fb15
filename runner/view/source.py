"""Where the viewer finds runs, and who may see which.

A `RunSource` names runs and gives the directory of each (its `events.jsonl`,
`report.json`, `policy.json`, `changes.patch`). A `Viewer` is what a request was let in
as: it sees some runs. A run it does not see answers 404, exactly as a run that does not
exist, so a tenant learns nothing of others' runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# Run ids as the orchestrator makes them (20261205-170708-c51abe), with room for other
# sources' ids; never a path separator or a leading dot.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RunSource(Protocol):
    def run_ids(self) -> Iterable[str]:
        """Ids of the runs this source holds, newest first."""

    def run_dir(self, run_id: str) -> Path | None:
        """The run's directory, or None when there is no such run."""


class Viewer(Protocol):
    def sees(self, run_id: str) -> bool: ...


@dataclass(frozen=True)
class _Everyone:
    def sees(self, run_id: str) -> bool:
        return True


ALL_RUNS: Viewer = _Everyone()


@dataclass(frozen=True)
class Only:
    """A viewer that sees the runs a predicate accepts (a tenant's own runs, say)."""

    accepts: Callable[[str], bool]

    def sees(self, run_id: str) -> bool:
        return self.accepts(run_id)


class LocalRuns:
    """A `runs/` directory: one sub-directory per run, named by its id."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_ids(self) -> list[str]:
        try:
            names = [e.name for e in self.root.iterdir() if RUN_ID.match(e.name) and e.is_dir()]
        except OSError:
            return []
        # Ids begin with their start time, so the newest sort last.
        return sorted(names, reverse=True)

    def run_dir(self, run_id: str) -> Path | None:
        if not RUN_ID.match(run_id) or ".." in run_id:
            return None
        path = self.root / run_id
        return path if path.is_dir() else None
