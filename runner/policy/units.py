"""Sizes ("256m") and durations ("600s") as they are written in policy files."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_FACTOR = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as 256m")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            n = float(m.group(1)) * _SIZE_FACTOR[m.group(2).lower()]
            if not math.isfinite(n):  # 400 digits: int() of it would raise OverflowError
                raise ValueError(f"{value[:40]!r}... is too large a size")
            return int(n)
    raise ValueError(f"{value!r} is not a size (use bytes or a suffix k, m, g: 256m)")


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration must be seconds or a string such as 600s")
    if isinstance(value, int | float):
        # NaN (JSON's NaN, YAML's .nan) compares false with every bound, so it would pass
        # `<= 0` and `> max` and every floor's "more than" alike.
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number of seconds")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_FACTOR[(m.group(2) or "s").lower()]
            if not math.isfinite(seconds):
                raise ValueError(f"{value[:40]!r}... is too long a duration")
            return seconds
    raise ValueError(f"{value!r} is not a duration (use seconds or a suffix ms, s, m, h: 600s)")


def format_size(n: int) -> str:
    for suffix, factor in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def format_duration(seconds: float) -> str:
    # Never an exponent: what is written must parse again (a policy is dumped to JSON
    # and validated again when command-line flags are applied on top of it).
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"


Size = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _SIZE.pattern}],
         "description": "bytes, or a number with a suffix k, m, g, t (256m)"}
    ),
]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "minimum": 0},
                   {"type": "string", "pattern": _DURATION.pattern}],
         "description": "seconds, or a number with a suffix ms, s, m, h (600s)"}
    ),
]
