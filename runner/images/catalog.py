"""The images beyond `base`, registered by the agents that need them."""

from __future__ import annotations

_loaded = False


def load_catalog() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # Agents register their images on import (see runner/agents/).
    import runner.agents  # noqa: F401
