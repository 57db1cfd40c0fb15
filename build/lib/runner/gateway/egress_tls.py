"""Read the server name (SNI) from a TLS ClientHello without terminating TLS.

The proxy has already fixed the tunnel's destination address and port; the SNI check
catches the next cheapest trick, asking the allowed address (often a CDN or a shared
front end) for a different site by name. It cannot see the Host header inside TLS, so it
does not stop domain fronting by a client that sends a matching SNI; the address and
port check is the boundary, SNI is a tripwire on top.

Only the record and handshake framing needed to reach the server_name extension is
parsed; a ClientHello split over several records is reassembled up to a bound.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HELLO = 32 * 1024  # far above real ClientHellos (post-quantum ones are ~2 KiB)

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ECH = 0xFE0D
_NAME_HOST = 0x00


class Peek(enum.Enum):
    NEED_MORE = "need-more"  # a TLS record has started; read more bytes
    NOT_TLS = "not-tls"  # the client speaks something else
    MALFORMED = "malformed"  # looks like TLS but is not a valid ClientHello


@dataclass(frozen=True)
class ClientHello:
    sni: str | None  # normalised (lower case, no trailing dot), None when absent
    ech: bool  # Encrypted ClientHello offered: the real name is hidden from us


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked big-endian reads over one handshake message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> bytes:
        return self.take(self.uint(len_bytes))

    def done(self) -> bool:
        return self.pos == len(self.data)


def _handshake_bytes(buf: bytes) -> bytes | Peek:
    """Concatenate handshake-record payloads until one whole handshake message is there."""
    if not buf:
        return Peek.NEED_MORE
    if buf[0] != _HANDSHAKE or (len(buf) > 1 and buf[1] != 0x03):
        return Peek.NOT_TLS
    payload = bytearray()
    pos = 0
    while True:
        if len(payload) >= 4:
            need = 4 + int.from_bytes(payload[1:4], "big")
            if payload[0] != _CLIENT_HELLO or need > MAX_HELLO:
                return Peek.MALFORMED
            if len(payload) >= need:
                return bytes(payload[:need])
        if pos + 5 > len(buf):
            return Peek.NEED_MORE
        if buf[pos] != _HANDSHAKE or buf[pos + 1] != 0x03:
            return Peek.MALFORMED  # anything else before the ClientHello is complete
        length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 256:
            return Peek.MALFORMED
        if pos + 5 + length > len(buf):
            return Peek.NEED_MORE
        payload += buf[pos + 5 : pos + 5 + length]
        pos += 5 + length


def _server_name(data: bytes) -> str:
    names = _Reader(_Reader(data).vector(2))
    host: str | None = None
    while not names.done():
        kind, name = names.uint(1), names.vector(2)
        if kind == _NAME_HOST:
            if host is not None or not name:
                raise _Malformed  # RFC 6066: at most one host_name
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError as exc:
                raise _Malformed from exc
    if host is None:
        raise _Malformed
    return host.lower().removesuffix(".")


def _parse_hello(message: bytes) -> ClientHello:
    r = _Reader(message[4:])
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # session id
    r.vector(2)  # cipher suites
    r.vector(1)  # compression methods
    if r.done():
        return ClientHello(None, False)  # no extensions at all
    exts = _Reader(r.vector(2))
    sni: str | None = None
    seen: set[int] = set()
    while not exts.done():
        kind, data = exts.uint(2), exts.vector(2)
        if kind in seen:
            raise _Malformed  # duplicate extensions are illegal and a parser-confusion trick
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            sni = _server_name(data)
    return ClientHello(sni, _EXT_ECH in seen)


def peek_client_hello(buf: bytes) -> ClientHello | Peek:
    """Judge the first bytes a client sent into a tunnel."""
    message = _handshake_bytes(buf)
    if isinstance(message, Peek):
        if message is Peek.NEED_MORE and len(buf) > MAX_HELLO + 5 * 8:
            return Peek.MALFORMED
        return message
    try:
        return _parse_hello(message)
    except _Malformed:
        return Peek.MALFORMED
