"""The host end of the shim's control socket.

The shim connects once, before the agent starts, and reports over it (ready, self-test,
agent started, agent exit). Only that first connection is believed: the agent runs as
the same user and can see the socket, so any later connection is refused and logged.
The host holding this connection open is what keeps the sandbox alive (dead-man switch).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_LINE = 64 * 1024
# Refused connections past this many are slowed down (each costs REFUSED_PAUSE): a
# sandbox looping on connect() cannot spin the host's accept thread. The log records
# the first ones and counts the rest (EventLog.refusal).
REFUSED_FREE = 100
REFUSED_PAUSE = 0.01


class ControlServer:
    def __init__(self, path: Path, on_message: Callable[[dict[str, Any]], None],
                 on_refused: Callable[[], None]) -> None:
        self.path = path
        self._on_message = on_message
        self._on_refused = on_refused
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)
        self._sock.listen(4)
        self._conn: socket.socket | None = None
        self._closed = threading.Event()
        self.connected = threading.Event()
        self.refused = 0
        self._thread = threading.Thread(target=self._serve, name="airlock-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._admit(conn):
                conn.close()
                self.refused += 1
                self._on_refused()
                if self.refused > REFUSED_FREE:
                    self._closed.wait(REFUSED_PAUSE)
                continue
            self._conn = self._conn or conn
            self.connected.set()
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _admit(self, conn: socket.socket) -> bool:
        """Only the first connection is the shim's; any later one is refused."""
        return self._conn is None

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict):
                        self._on_message(msg)
            if len(buf) > MAX_LINE:
                buf = b""

    def close(self) -> None:
        self._closed.set()
        for s in (self._conn, self._sock):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
