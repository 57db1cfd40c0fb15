"""A watchdog process that cleans up after its parent if the parent is killed.

The shim ends a sandbox whose host connection drops (the dead-man switch), but the
stopped container and the run's scratch directory would stay until the next `airlock
gc`. The first run in a process starts one reaper, which holds the read end of a pipe:
when the parent dies (even by SIGKILL) the pipe closes and the reaper runs gc for runs
whose owner is gone. A parent that ends normally says "done" first, and the reaper
leaves without touching the engine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

_lock = threading.Lock()
_pipe_w: int | None = None
_needs_gc = False


def needs_gc() -> None:
    """Something could not be removed (the engine was away): gc after this process ends."""
    global _needs_gc
    _needs_gc = True


def ensure_reaper() -> None:
    global _pipe_w
    with _lock:
        if _pipe_w is not None or os.environ.get("AIRLOCK_NO_REAPER"):
            return
        r, w = os.pipe()
        os.set_inheritable(r, True)
        try:
            subprocess.Popen([sys.executable, "-m", "runner.run.reaper"], stdin=r,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, close_fds=True)
        except OSError:
            os.close(w)
            return
        finally:
            os.close(r)
        _pipe_w = w
        import atexit

        atexit.register(_done)


def _done() -> None:
    global _pipe_w
    if _pipe_w is not None:
        with contextlib.suppress(OSError):
            os.write(_pipe_w, b"gc\n" if _needs_gc else b"done\n")
        os.close(_pipe_w)
        _pipe_w = None


def main() -> int:
    data = sys.stdin.buffer.read()  # blocks until the parent is gone
    if data.startswith(b"done"):
        return 0
    # The parent died without finishing: its runs are over.
    import time

    from runner.engines.docker_engine import DockerEngine
    from runner.run.gc import collect

    # Give a restarting engine up to a minute to come back.
    deadline = time.monotonic() + 60
    while True:
        try:
            collect(DockerEngine())
            return 0
        except Exception:
            if time.monotonic() > deadline:
                return 1
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
