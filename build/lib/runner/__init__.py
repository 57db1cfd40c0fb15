"""Airlock: run LLM agents in throwaway containers that reach nothing but their provider.

The public API is small; everything under `runner.*` sub-packages is private.
(`execute` rather than `run`: `runner.run` is the orchestrator's package.)
Names are imported on first use so that `airlock` (the CLI) starts quickly.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: `import runner` is on every CLI start
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["Event", "Policy", "Pool", "RunHandle", "RunResult", "as_policy", "execute",
           "load_policy", "start", "warm_pool"]

if TYPE_CHECKING:
    from runner.api import RunHandle, as_policy, execute, load_policy, start, warm_pool
    from runner.events.log import Event
    from runner.policy.models import Policy
    from runner.run.pool import Pool
    from runner.run.report import RunResult

_WHERE = {
    "execute": "runner.api", "start": "runner.api", "load_policy": "runner.api",
    "as_policy": "runner.api", "warm_pool": "runner.api", "RunHandle": "runner.api",
    "Event": "runner.events.log",
    "Policy": "runner.policy.models", "Pool": "runner.run.pool", "RunResult": "runner.run.report",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazily imported names are part of the module: dir(runner) lists them.
    return sorted({*globals(), *_WHERE})
