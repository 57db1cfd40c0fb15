"""Untrusted values made small and plain before they go into an event.

Anything a sandbox sends (a path, a model name, a tool's arguments, a header) can be long,
deeply nested, or not even text. `clip()` turns it into plain JSON types of bounded size:
strings cut to a limit (saying how much was cut), containers cut to a number of items and
a depth, bytes shown escaped, anything else by its type name. The event log writes what
it returns without any further surprise.
"""

from __future__ import annotations

import math
from typing import Any

STRING_CAP = 512  # characters of one untrusted string kept in an event
ITEMS_CAP = 32  # entries of one list or object kept
DEPTH_CAP = 4  # levels of nesting kept
KEY_CAP = 64  # characters of an object key kept


def clip_text(text: str, limit: int = STRING_CAP) -> str:
    """`text` cut to `limit` characters, saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[+{len(text) - limit} chars]"


def clip(value: Any, limit: int = STRING_CAP, *, items: int = ITEMS_CAP,
         depth: int = DEPTH_CAP) -> Any:
    """A JSON-plain copy of `value` no bigger than the caps (see the module docstring)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Python writes ints of any size, slowly, and refuses past 4300 digits.
        return int(value) if value.bit_length() <= 256 else f"[int of {value.bit_length()} bits]"
    if isinstance(value, float):
        # NaN and infinities are not JSON; an agent can send them (Python's json reads them).
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return clip_text(value, limit)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value[: limit * 4])
        return clip_text(raw.decode("utf-8", errors="backslashreplace"), limit)
    if depth <= 0:
        return f"[{type(value).__name__} nested too deep]"
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for n, (k, v) in enumerate(value.items()):
            if n >= items:
                out["..."] = f"+{len(value) - items} more entries"
                break
            out[clip_text(k if isinstance(k, str) else str(clip(k, KEY_CAP)), KEY_CAP)] = clip(
                v, limit, items=items, depth=depth - 1)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        seq = list(value)
        kept = [clip(v, limit, items=items, depth=depth - 1) for v in seq[:items]]
        if len(seq) > items:
            kept.append(f"...+{len(seq) - items} more items")
        return kept
    return f"[{type(value).__name__}]"
