"""The few messages between `airlock run` (the client) and `airlock serve`.

A frame is one kind byte, a 4-byte big-endian length and that many bytes of payload
(JSON unless noted). The client's hello also carries its stdin, stdout and stderr as
file descriptors (SCM_RIGHTS): the server writes the run's output straight to the
client's terminal or pipes, so nothing is relayed or buffered on the way.

    client -> server   HELLO  {"v", "argv", "cwd", "env", "prog", "runner"}  + fds 0, 1, 2
    server -> client   NEED   ["NAME", ...]        variables the run may read
    client -> server   ENV    {"NAME": "value"}    those the client has
    server -> client   START  (empty)              the server runs it from here on
    client -> server   INTERRUPT (empty)           Ctrl-C / SIGTERM on the client
    server -> client   EXIT   {"code": N}
    server -> client   FALLBACK {"reason"}         run it in the client's own process

Standard library only: the thin client imports this on every `airlock run`.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
# Where this Airlock is installed (its `runner` package), sent with the hello: a server
# loaded from another installation hands the run back.
INSTALLATION = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO, NEED, ENV, START, INTERRUPT, EXIT, FALLBACK = (b"H", b"N", b"E", b"S", b"I", b"X", b"F")
MAX_FRAME = 4 << 20
_HEAD = struct.Struct(">cI")


class ProtocolError(Exception):
    pass


def pack(kind: bytes, payload: Any = None) -> bytes:
    body = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
    return _HEAD.pack(kind, len(body)) + body


def send(sock: socket.socket, kind: bytes, payload: Any = None,
         fds: list[int] | None = None) -> None:
    data = pack(kind, payload)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)


class Reader:
    """Frames from a stream socket; collects file descriptors passed along with them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def _fill(self) -> bool:
        data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            return False
        self.buf += data
        return True

    def frame(self) -> tuple[bytes, bytes] | None:
        """The next (kind, payload), or None when the peer closed the connection."""
        while len(self.buf) < _HEAD.size:
            if not self._fill():
                return None
        kind, size = _HEAD.unpack_from(self.buf)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes")
        while len(self.buf) < _HEAD.size + size:
            if not self._fill():
                return None
        body = self.buf[_HEAD.size:_HEAD.size + size]
        self.buf = self.buf[_HEAD.size + size:]
        return kind, body


def loads(body: bytes) -> Any:
    return json.loads(body) if body else None
