"""A click command run with Airlock's refusals: one line on stderr, the fix, the code.

Click's own usage errors (an unknown flag, a missing argument) print a usage block and
a boxed message; every other refusal of Airlock's is one line, so these are too. Used
by the in-process CLI and by the per-user server's worker alike.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any


@functools.cache  # each served run invokes a command: the failed imports once only
def _errors(attr: str) -> tuple[type[Any], ...]:
    # Newer typer carries its own copy of click (`typer._click`) and its own Abort;
    # older ones use click's.
    found: set[type[Any]] = set()
    for name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        with contextlib.suppress(ImportError):
            value = getattr(importlib.import_module(name), attr, None)
            if isinstance(value, type):
                found.add(value)
    return tuple(found)


def invoke(call: Callable[[], Any]) -> int:
    """Run a click command called with standalone_mode=False; its exit code."""
    usage, failed, aborted = _errors("UsageError"), _errors("ClickException"), _errors("Abort")
    try:
        rv = call()
    except usage as exc:
        ctx = getattr(exc, "ctx", None)
        # the program's name as users type it, whatever started it (`python -m ...`)
        names: list[str] = []
        while ctx is not None and ctx.parent is not None:
            names.insert(0, str(ctx.info_name))
            ctx = ctx.parent
        where = " ".join(["airlock", *names])
        sys.stderr.write(f"airlock: {exc.format_message()}; fix: see `{where} --help`\n")
        return int(exc.exit_code)
    except failed as exc:
        sys.stderr.write(f"airlock: {exc.format_message()}\n")
        return int(exc.exit_code)
    except aborted:
        sys.stderr.write("airlock: aborted\n")
        return 1
    # Not standalone, an `Exit(code)` comes back as the return value.
    return rv if isinstance(rv, int) else 0
