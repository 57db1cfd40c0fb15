"""`airlock gc`: remove what runs left behind when their host process died.

An object is over when the process that owns it (host name, pid and that process's
start time, in its label) is certainly gone. Runs of live processes, and runs of other
hosts sharing the engine, are left alone.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from runner.engines import Engine
from runner.engines.base import ManagedObject
from runner.run.owner import owner_alive
from runner.run.workspace import leftover_mounts, unmount

SCRATCH_PREFIX = "airlock-run-"
OWNER_FILE = "owner"
FRESH_SECONDS = 60


@dataclass
class GcReport:
    removed: list[str]
    kept: int


def owner_of(obj: ManagedObject) -> str:
    """Whose an object is: a pooled sandbox's owner file, once a run claimed it, names
    the run's process; its label names the pool's, which may have handed it on."""
    if obj.scratch:
        scratch = Path(obj.scratch)
        if is_scratch(scratch):
            with contextlib.suppress(OSError):
                return (scratch / OWNER_FILE).read_text().strip() or obj.owner
    return obj.owner


def collect(engine: Engine | None, *, include_live: bool = False) -> GcReport:
    removed: list[str] = []
    kept = 0
    if engine is not None:
        for obj in engine.managed():
            if include_live or not owner_alive(owner_of(obj)):
                engine.remove_object(obj)
                removed.append(f"{obj.kind} {obj.id[:12]} (run {obj.run_id})")
            else:
                kept += 1
    dead_mounts = leftover_mounts(SCRATCH_PREFIX)
    for scratch in Path(tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        try:
            owner = (scratch / OWNER_FILE).read_text().strip()
        except OSError:
            owner = ""
        if not owner and not include_live:
            # A run writes its owner file just after creating the directory: one
            # without it (or with it still empty) that is only moments old is being
            # set up, not left over.
            with contextlib.suppress(OSError):
                if time.time() - scratch.stat().st_mtime < FRESH_SECONDS:
                    continue
        if include_live or not owner_alive(owner):
            remove_scratch(scratch, dead_mounts)
            removed.append(f"directory {scratch}")
    return GcReport(removed, kept)


def is_scratch(path: Path) -> bool:
    """A run's or a pooled sandbox's scratch directory (never anything else to remove)."""
    return path.name.startswith(SCRATCH_PREFIX) and path.parent == Path(tempfile.gettempdir())


def remove_scratch(scratch: Path, mounts: list[Path] | None = None) -> None:
    # A dead run's workspace copy is still mounted: detach it first, or its memory
    # stays held and the directory cannot go.
    for mount in leftover_mounts(SCRATCH_PREFIX) if mounts is None else mounts:
        if mount.parent == scratch:
            unmount(mount)
    shutil.rmtree(scratch, ignore_errors=True)
