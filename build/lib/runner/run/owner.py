"""Who owns a sandbox: this host process, identified so that a dead owner is certain."""

from __future__ import annotations

import os
import socket


def _start_time(pid: int) -> str | None:
    """The process's start time; None when it is gone or a zombie (dead, not yet reaped:
    its parent may be an init that reaps late, or never)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            # Field 22 is the start time; the command name (field 2) may hold spaces.
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def owner_label() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '0'}"


def owner_alive(label: str) -> bool:
    """False only when the owner is certainly gone (same host, process dead or reused)."""
    try:
        host, pid_text, start = label.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return True  # another host's run: not ours to judge
    current = _start_time(pid)
    return current is not None and current == start
