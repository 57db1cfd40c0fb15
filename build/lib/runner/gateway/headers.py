"""Which headers cross the gateway, and scrubbing of secrets from what flows back.

Request headers from the sandbox pass except the ones that carry credentials, route
or account the request, or belong to one hop only; the gateway then sets its own
credential. Response headers pass except hop-by-hop ones, cookies and account ids.
"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})

# Client credentials (the placeholder key, or anything the agent made up), and
# headers that would pick an account or carry cookies.
CLIENT_AUTH = frozenset({
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
    "cookie", "openai-organization", "openai-project", "chatgpt-account-id",
    "x-goog-user-project", "anthropic-dangerous-direct-browser-access",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip",
})

# accept-encoding is dropped so the upstream answers in identity encoding: usage is
# read from the bytes as they pass, and compressed bytes cannot be read that way.
REQUEST_DROP = HOP_BY_HOP | CLIENT_AUTH | {"accept-encoding", "expect"}

RESPONSE_DROP = HOP_BY_HOP | frozenset({
    "content-encoding", "set-cookie", "openai-organization", "openai-project",
    "anthropic-organization-id", "alt-svc", "server-timing", "via",
})


def first_header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of `name` (lower-cased) in lower-cased header pairs."""
    for k, v in headers:
        if k == name:
            return v
    return None


def request_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in REQUEST_DROP]


def response_headers(headers: Iterable[tuple[str, str]],
                     secrets: Iterable[str] = ()) -> list[tuple[str, str]]:
    secret_list = [s for s in secrets if s]
    return [(k, v) for k, v in headers
            if k.lower() not in RESPONSE_DROP and not any(s in v for s in secret_list)]


REDACTED = "[REDACTED]"


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class Scrubber:
    """Replaces secrets in a byte stream, including ones split across chunks.

    Only a chunk's tail that could be the start of a secret is held back until the
    next chunk; streamed events end in newlines, which no key starts with, so in
    practice nothing is delayed.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = [s.encode() for s in secrets if s and len(s) >= 8]
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.secrets:
            return chunk
        data = self._carry + chunk
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, REDACTED.encode())
        hold = 0
        for secret in self.secrets:
            hold = max(hold, _partial_suffix(data, secret))
        self._carry = data[len(data) - hold:] if hold else b""
        return data[: len(data) - hold] if hold else data

    def flush(self) -> bytes:
        out, self._carry = self._carry, b""
        return out


def _partial_suffix(data: bytes, secret: bytes) -> int:
    """Length of the longest suffix of `data` that is a proper prefix of `secret`."""
    first = secret[:1]
    start = max(0, len(data) - len(secret) + 1)
    i = data.find(first, start)
    while i != -1:
        if secret.startswith(data[i:]):
            return len(data) - i
        i = data.find(first, i + 1)
    return 0
