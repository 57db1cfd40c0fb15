"""Recording provider exchanges to JSONL, and serving them back in order.

File format (one JSON object per line):
- first line, the header: `{"airlock_recording": 1, "backend": "anthropic", ...}`;
- then one line per exchange, written when it ends:
  `{"seq", "method", "path", "query", "model", "stream", "body_sha256",
    "request": {"headers": {...}, "body": <json>},
    "response": {"status", "headers": [[k, v], ...], "chunks": [{"t": ms, "text"|"b64"}]}}`
  `chunks` are the response bytes as they reached the agent, split as they arrived,
  with their offset in milliseconds from the start of the response.

Credentials never reach the file: credential headers are dropped, and the real
secret is replaced by `[REDACTED]` anywhere in the line before it is written.

Replay matching (documented contract): requests are served strictly in recorded
order; the next unserved exchange must have the same method, path, model (the full
id after policy resolution) and stream flag. The request body is *not* required to
match byte for byte, since agents put session ids, timestamps and temp paths in
their requests; whether the body's hash matched is reported on the request's event.
A request that does not match is answered with an error and does not consume the
exchange.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from runner.errors import BadInput
from runner.gateway.headers import CLIENT_AUTH, redact_text

FORMAT_VERSION = 1


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class Exchange:
    seq: int
    method: str
    path: str
    query: str
    model: str | None
    stream: bool
    body_sha256: str
    request_headers: dict[str, str]
    request_body: Any
    requested_model: str | None = None  # as the agent named it (a role or an alias)
    status: int = 0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)

    def add_chunk(self, data: bytes) -> None:
        self.chunks.append((round((time.monotonic() - self._t0) * 1000, 3), data))

    def to_json(self) -> dict[str, Any]:
        chunks = []
        for t, data in self.chunks:
            try:
                chunks.append({"t": t, "text": data.decode("utf-8")})
            except UnicodeDecodeError:
                chunks.append({"t": t, "b64": base64.b64encode(data).decode()})
        return {
            "seq": self.seq, "method": self.method, "path": self.path, "query": self.query,
            "model": self.model, "requested_model": self.requested_model,
            "stream": self.stream, "body_sha256": self.body_sha256,
            "request": {"headers": self.request_headers, "body": self.request_body},
            "response": {"status": self.status,
                         "headers": [list(h) for h in self.response_headers],
                         "chunks": chunks},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Exchange:
        chunks = []
        for c in d["response"]["chunks"]:
            data = c["text"].encode() if "text" in c else base64.b64decode(c["b64"])
            chunks.append((float(c.get("t", 0)), data))
        return cls(
            seq=d["seq"], method=d["method"], path=d["path"], query=d.get("query", ""),
            model=d.get("model"), stream=bool(d.get("stream")),
            body_sha256=d.get("body_sha256", ""),
            request_headers=d["request"].get("headers", {}),
            request_body=d["request"].get("body"), requested_model=d.get("requested_model"),
            status=d["response"]["status"],
            response_headers=[(k, v) for k, v in d["response"]["headers"]], chunks=chunks)


def recordable_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in CLIENT_AUTH}


class Recorder:
    """Appends exchanges to a JSONL file, one flushed line each (a crash keeps a prefix)."""

    def __init__(self, path: Path, backend: str, secrets: Iterable[str]) -> None:
        self.path = path
        self._secrets = list(secrets)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fh: TextIO | None = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._write({"airlock_recording": FORMAT_VERSION, "backend": backend,
                     "created": round(time.time(), 3)})

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self._secrets = list(secrets)

    def _write(self, obj: dict[str, Any]) -> None:
        line = redact_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")),
                           self._secrets)
        with self._lock:
            if self._fh is not None:
                self._fh.write(line + "\n")
                self._fh.flush()

    def write(self, exchange: Exchange) -> None:
        self._write(exchange.to_json())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class ReplayError(BadInput):
    """The replay file cannot be used."""


@dataclass
class Mismatch:
    index: int
    expected: dict[str, Any] | None
    got: dict[str, Any]

    @property
    def message(self) -> str:
        if self.expected is None:
            return (f"replay: request {self.index + 1} has no recorded exchange "
                    f"(the recording has {self.index})")
        return (f"replay: request {self.index + 1} does not match the recording: expected "
                f"{_describe(self.expected)}, got {_describe(self.got)}")


def _describe(d: dict[str, Any]) -> str:
    return (f"{d['method']} {d['path']} model={d['model']} "
            f"{'stream' if d['stream'] else 'no-stream'}")


class Replayer:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as exc:
            raise ReplayError(f"replay file {path} cannot be read: {exc.strerror}") from None
        try:
            header = json.loads(lines[0]) if lines else {}
            if header.get("airlock_recording") != FORMAT_VERSION:
                raise ReplayError(f"{path} is not an airlock recording (version "
                                  f"{FORMAT_VERSION})")
            self.backend: str = header["backend"]
            self.exchanges = [Exchange.from_json(json.loads(ln)) for ln in lines[1:]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplayError(f"replay file {path} is malformed: {exc}") from None
        self._next = 0
        self._lock = threading.Lock()

    @property
    def models(self) -> dict[str, str]:
        """Every name the recorded run used for a model, to its full id."""
        out = {e.requested_model: e.model for e in self.exchanges
               if e.model and e.requested_model}
        out.update({e.model: e.model for e in self.exchanges if e.model})
        return out

    @property
    def position(self) -> int:
        return self._next

    def take(self, method: str, path: str, model: str | None,
             stream: bool) -> Exchange | Mismatch:
        got = {"method": method, "path": path, "model": model, "stream": stream}
        with self._lock:
            index = self._next
            if index >= len(self.exchanges):
                return Mismatch(index, None, got)
            ex = self.exchanges[index]
            expected = {"method": ex.method, "path": ex.path, "model": ex.model,
                        "stream": ex.stream}
            if expected != got:
                return Mismatch(index, expected, got)
            self._next += 1
            return ex
