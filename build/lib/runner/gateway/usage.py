"""Token usage and stop reason, read from a response while it streams past.

The meter sees every chunk on its way to the agent and keeps only an incomplete
line; it parses only the lines that can carry usage (a cheap byte test first), so a
long stream costs little. A plain JSON answer is kept (capped) and parsed at the end.

Normalised counts, the same for every provider, so a budget means one thing:
- `input_tokens`: every prompt token, cached or not (for Anthropic the sum of
  input, cache-creation and cache-read tokens; OpenAI already counts that way);
- `cache_read_tokens`, `cache_write_tokens`: the cached part of the input;
- `output_tokens`: generated tokens (reasoning included).
The budget is charged `input_tokens + output_tokens`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_LINE = 16 * 1024 * 1024
MAX_JSON = 32 * 1024 * 1024


@dataclass
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    stop_reason: str | None = None

    @property
    def total(self) -> int:
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    @property
    def reported(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    def as_event(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies, and this runs once per request.
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cache_read_tokens": self.cache_read_tokens,
                "cache_write_tokens": self.cache_write_tokens, "stop_reason": self.stop_reason}


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _sum(*vals: Any) -> int | None:
    ints = [i for i in (_int(v) for v in vals) if i is not None]
    return sum(ints) if ints else None


# Byte markers of the lines worth parsing, per stream kind: a non-null usage object or
# stop/finish reason (chat chunks carry `"finish_reason":null` and often
# `"usage":null` in every chunk), or a terminal Responses event.
_SSE_MARKERS = re.compile(rb'"usage": ?\{|"stop_reason": ?"|"finish_reason": ?"|'
                          rb"response\.(completed|incomplete|failed)")
_NDJSON_MARKERS = re.compile(rb'"done": ?true')


class UsageMeter:
    def __init__(self, content_type: str | None) -> None:
        ctype = (content_type or "").split(";")[0].strip().lower()
        self.mode = ("sse" if ctype == "text/event-stream"
                     else "ndjson" if ctype in ("application/x-ndjson", "application/jsonl")
                     else "json")
        self.usage = Usage()
        self._buf = bytearray()
        self._overflow = False
        # Anthropic splits usage over message_start and message_delta.
        self._anthropic: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> None:
        if self._overflow:
            return
        buf = self._buf
        buf += chunk
        if self.mode == "json":
            if len(buf) > MAX_JSON:
                self._overflow = True
                buf.clear()
            return
        end = buf.rfind(b"\n")
        if end != -1:
            # Most chunks are content deltas: one search over the complete lines decides
            # whether any of them is worth splitting out and parsing.
            markers = _SSE_MARKERS if self.mode == "sse" else _NDJSON_MARKERS
            if markers.search(buf, 0, end):
                for line in bytes(buf[:end]).split(b"\n"):
                    self._line(line)
            del buf[: end + 1]
        if len(buf) > MAX_LINE:
            self._overflow = True
            buf.clear()

    def finish(self) -> Usage:
        if self._buf and not self._overflow:
            if self.mode == "json":
                self._absorb_text(bytes(self._buf))
            else:
                self._line(bytes(self._buf))
        self._buf.clear()
        return self.usage

    def _line(self, line: bytes) -> None:
        if self.mode == "sse":
            if not line.startswith(b"data:") or not _SSE_MARKERS.search(line):
                return
            self._absorb_text(line[5:])
        elif _NDJSON_MARKERS.search(line):
            self._absorb_text(line)

    def _absorb_text(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except ValueError:
            return
        if isinstance(obj, dict):
            self._absorb(obj)

    def _absorb(self, obj: dict[str, Any]) -> None:
        otype = obj.get("type")
        u = self.usage
        if otype == "message_start" and isinstance(obj.get("message"), dict):
            self._anthropic_usage(obj["message"].get("usage"))
        elif otype == "message_delta":
            self._anthropic_usage(obj.get("usage"))
            delta = obj.get("delta") or {}
            if delta.get("stop_reason"):
                u.stop_reason = delta["stop_reason"]
        elif otype == "message":  # Anthropic, not streamed
            self._anthropic_usage(obj.get("usage"))
            u.stop_reason = obj.get("stop_reason") or u.stop_reason
        elif isinstance(otype, str) and otype.startswith("response.") and isinstance(
                obj.get("response"), dict):
            self._responses(obj["response"])
        elif obj.get("object") == "response":  # Responses, not streamed
            self._responses(obj)
        elif "choices" in obj or str(obj.get("object", "")).startswith("chat.completion"):
            self._chat(obj)
        elif obj.get("done") is True:  # Ollama native
            u.input_tokens = _int(obj.get("prompt_eval_count"))
            u.output_tokens = _int(obj.get("eval_count"))
            u.stop_reason = obj.get("done_reason") or "stop"

    def _anthropic_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        a = self._anthropic
        for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                    "cache_read_input_tokens"):
            if _int(usage.get(key)) is not None:
                a[key] = usage[key]  # later events carry cumulative values
        u = self.usage
        u.input_tokens = _sum(a.get("input_tokens"), a.get("cache_creation_input_tokens"),
                              a.get("cache_read_input_tokens"))
        u.output_tokens = _int(a.get("output_tokens"))
        u.cache_read_tokens = _int(a.get("cache_read_input_tokens"))
        u.cache_write_tokens = _int(a.get("cache_creation_input_tokens"))

    def _responses(self, resp: dict[str, Any]) -> None:
        u = self.usage
        status = resp.get("status")
        if isinstance(status, str) and status != "in_progress":
            reason = (resp.get("incomplete_details") or {}).get("reason")
            u.stop_reason = f"{status}:{reason}" if reason else status
        usage = resp.get("usage")
        if isinstance(usage, dict):
            u.input_tokens = _int(usage.get("input_tokens"))
            u.output_tokens = _int(usage.get("output_tokens"))
            u.cache_read_tokens = _int((usage.get("input_tokens_details") or {})
                                       .get("cached_tokens"))

    def _chat(self, obj: dict[str, Any]) -> None:
        u = self.usage
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                u.stop_reason = choice["finish_reason"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            u.input_tokens = _int(usage.get("prompt_tokens"))
            u.output_tokens = _int(usage.get("completion_tokens"))
            u.cache_read_tokens = _int((usage.get("prompt_tokens_details") or {})
                                       .get("cached_tokens"))
