"""A tenant's workspace pinned for its run, so that no symlink can move it.

A run names its workspace by a path under the tenant's root, and whoever can write
under that root (the tenant, or its own `rw` run going on meanwhile) can swap any
directory on that path for a symlink at any moment. Checking the path and then handing
it to the engine leaves a window: measured, a sandbox swapping `repo` and a symlink to
another tenant's workspace with renameat2(RENAME_EXCHANGE) every half millisecond got
2 of 12 runs naming `repo` to mount the other tenant's files, with a check just before
the run started.

So the path is walked one directory at a time from the root, each opened with
O_PATH | O_NOFOLLOW | O_DIRECTORY (a symlink anywhere fails with ENOTDIR), and the
directory reached is bind-mounted by its descriptor onto a private, root-only path.
The run, the copy, the pool's snapshot and the engine see that path, which nobody else
can change; it is detached when the run ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from pathlib import Path

from runner.run.workspace import unmount

PIN_PREFIX = "airlock-pin-"  # not the runs' scratch prefix: gc's rmtree never walks in
_MS_BIND = 4096
_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


class Moved(Exception):
    """A directory on the way is not one (a symlink put in its place, or gone)."""


def open_beneath(root: Path, path: Path) -> int:
    """A descriptor of `path`, reached from `root` without following any symlink."""
    rel = path.relative_to(root)  # ValueError when outside
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.parts:
            try:
                nxt = os.open(part, _FLAGS, dir_fd=fd)
            except OSError as exc:
                raise Moved(f"{part!r}: {exc.strerror}") from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class Pinned:
    """`path` is the pinned directory while this lives; `release()` detaches it."""

    def __init__(self, root: Path, accepted: Path) -> None:
        fd = open_beneath(root, accepted)
        try:
            self.scratch = Path(tempfile.mkdtemp(prefix=PIN_PREFIX))  # 0700
            self.path = self.scratch / "workspace"
            self.path.mkdir()
            libc = ctypes.CDLL(None, use_errno=True)
            source = f"/proc/self/fd/{fd}".encode()
            if libc.mount(source, os.fsencode(self.path), None, _MS_BIND, None) != 0:
                err = ctypes.get_errno()
                self._remove_dirs()
                raise OSError(err, f"bind-mounting the workspace: {os.strerror(err)}")
        finally:
            os.close(fd)

    def _remove_dirs(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()
        with contextlib.suppress(OSError):
            self.scratch.rmdir()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            unmount(self.path)
        # rmdir only: never anything that could walk into a mount still attached
        self._remove_dirs()
