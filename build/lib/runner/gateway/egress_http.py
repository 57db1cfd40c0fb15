"""The small, strict HTTP/1.x subset the egress proxy speaks with the sandbox.

Strict on purpose: anything two parsers could read differently (bare LF, obs-fold,
duplicate Host or Content-Length, Transfer-Encoding on a proxied request) is refused
rather than normalised, so what the proxy checked is what the upstream receives.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from runner.gateway.egress_rules import TargetError, normalise_name, parse_authority

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD = re.compile(r"^[A-Z]{1,20}$")

# Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1), plus the
# proxy's own credentials header, which must not leak upstream.
HOP_BY_HOP = frozenset(
    {"connection", "proxy-connection", "keep-alive", "proxy-authorization",
     "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade"}
)

REASONS = {
    400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


class HeadError(Exception):
    """A request the proxy answers with an error status; `reason` is the event's code."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


async def read_head(reader: asyncio.StreamReader, max_bytes: int) -> tuple[bytes, bytes] | None:
    """The request head (without the blank line) and any bytes after it, None on a
    connection closed before sending anything. The caller bounds the time it takes."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            if end > max_bytes:
                break
            return bytes(buf[:end]), bytes(buf[end + 4 :])
        if len(buf) > max_bytes:
            break
        chunk = await reader.read(4096)
        if not chunk:
            if not buf:
                return None
            raise HeadError(400, "incomplete-head", "connection closed inside the request head")
        buf += chunk
    raise HeadError(431, "head-too-large", f"request head over {max_bytes} bytes")


def parse_head(raw: bytes, max_lines: int) -> RequestHead:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HeadError(400, "bad-head", "non-ASCII bytes in the request head") from exc
    lines = text.split("\r\n")
    if len(lines) > max_lines + 1:
        raise HeadError(431, "head-too-large", f"more than {max_lines} header lines")
    if any("\r" in line or "\n" in line or "\0" in line for line in lines):
        raise HeadError(400, "bad-head", "bare CR, LF or NUL in the request head")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _METHOD.match(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError(400, "bad-request-line", "request line is not METHOD TARGET HTTP/1.x")
    head = RequestHead(parts[0], parts[1], parts[2])
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):  # also refuses obs-fold (leading space)
            raise HeadError(400, "bad-header", "malformed header line")
        head.headers.append((name, value.strip(" \t")))
    return head


def host_matches(head: RequestHead, host: str, port: int, default_port: int,
                 *, required: bool) -> None:
    """Refuse a request whose Host header names anything but the checked target."""
    values = head.values("host")
    if not values:
        if required:
            raise HeadError(400, "host-missing", "request has no Host header")
        return
    if len(values) > 1:
        raise HeadError(400, "host-duplicate", "request has more than one Host header")
    try:
        h_host, h_port = parse_authority(values[0], default_port)
        h_host = h_host if ":" in h_host else normalise_name(h_host)
    except TargetError as exc:
        raise HeadError(403, "host-mismatch", "Host header is not a valid host") from exc
    if h_host != host or h_port != port:
        raise HeadError(403, "host-mismatch", "Host header differs from the request target")


def content_length(head: RequestHead) -> int:
    """The body length of a proxied request; chunked bodies are refused, not parsed."""
    if head.values("transfer-encoding"):
        raise HeadError(411, "transfer-encoding", "chunked request bodies are not proxied")
    values = head.values("content-length")
    if not values:
        return 0
    if len(values) > 1 or not values[0].isdigit() or len(values[0]) > 15:
        raise HeadError(400, "bad-content-length", "one decimal Content-Length is required")
    return int(values[0])


def forward_head(head: RequestHead, origin: str) -> bytes:
    """The request as the upstream sees it: origin-form, hop-by-hop headers removed,
    and `Connection: close` so one client connection carries exactly one request."""
    named = {
        t.strip().lower() for v in head.values("connection") for t in v.split(",") if t.strip()
    }
    lines = [f"{head.method} {origin} {head.version}"]
    for name, value in head.headers:
        low = name.lower()
        if low not in HOP_BY_HOP and low not in named:
            lines.append(f"{name}: {value}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def error_response(status: int, reason: str, detail: str) -> bytes:
    """A short plain-text answer; the reason code doubles as a header for scripts."""
    safe = re.sub(r"[^\x20-\x7e]", "?", detail)[:200]
    body = f"airlock proxy: {reason}: {safe}\n".encode("ascii")
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Airlock-Reason: {reason}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode("ascii") + body


def split_absolute_http(target: str) -> tuple[str, str]:
    """http://authority/path?query -> (authority, origin-form path); fragments dropped."""
    if target[:7].lower() != "http://":
        raise HeadError(400, "bad-target", "a proxied request needs an absolute http:// URI")
    rest = target[7:]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, origin = rest[:cut], rest[cut:].partition("#")[0]
    if not origin.startswith("/"):
        origin = "/" + origin
    return authority, origin
