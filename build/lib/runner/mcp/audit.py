"""What a tool call looks like in the event log: arguments redacted and capped, sizes measured.

The log is kept for the whole run and read by people and tools that should not learn the
secrets an agent passed to a tool, and one huge argument must not bloat every copy of it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import mcp_types as types

ARGUMENTS_CAP = 4096  # bytes of JSON kept per call in the log
ERROR_CAP = 1024  # characters of an error message kept per call
REDACTED = "[redacted]"

# Key names whose values are credentials more often than not. Over-redacting a harmless
# `keyword` costs a little detail in the log; under-redacting a token costs the token.
SECRET_KEY = re.compile(
    r"token|key|passw(or)?d|secret|authori[sz]ation|credential|cookie|session[-_]?id",
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """A copy of `value` with the values of secret-looking keys replaced, at any depth."""
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _utf8(text: str) -> bytes:
    # An agent can send any string, a lone surrogate included, which UTF-8 cannot hold:
    # measured and previewed escaped, never an error (the call must stay recordable).
    return text.encode("utf-8", errors="backslashreplace")


def logged_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Event fields for a call's arguments: `arguments` (redacted; a string preview when too
    big, with `arguments_truncated`), and `arguments_bytes`, the redacted JSON's full size."""
    text = _json(redact(arguments))
    size = len(_utf8(text))
    if size <= ARGUMENTS_CAP:
        return {"arguments": json.loads(text), "arguments_bytes": size}
    preview = _utf8(text)[:ARGUMENTS_CAP].decode(errors="ignore")
    return {"arguments": preview, "arguments_bytes": size, "arguments_truncated": True}


def result_bytes(result: types.CallToolResult) -> int:
    """Size of the result as it goes to the agent (its JSON form)."""
    try:
        return len(result.model_dump_json(by_alias=True, exclude_none=True).encode())
    except ValueError:
        # Text UTF-8 cannot hold (a lone surrogate from a file name, say): measured escaped,
        # since the call must be recorded whatever it returned.
        return len(json.dumps(result.model_dump(by_alias=True, exclude_none=True),
                              default=str).encode())


def result_error_text(result: types.CallToolResult) -> str:
    """The text an is_error result carries, for the log."""
    texts = [block.text for block in result.content if isinstance(block, types.TextContent)]
    return capped(" ".join(texts) or "the tool reported an error")


def capped(text: str, limit: int = ERROR_CAP) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more]"
