"""Container engines behind one interface (`runner.engines.base.Engine`)."""

from __future__ import annotations

from collections.abc import Callable

from runner.engines.base import ContainerSpec, Engine, EngineInfo, Exit, Mount, Sandbox
from runner.errors import BadInput

_PROVIDERS: dict[str, Callable[[], Engine]] = {}


def register(name: str, factory: Callable[[], Engine]) -> None:
    _PROVIDERS[name] = factory


def _docker() -> Engine:
    from runner.engines.docker_engine import DockerEngine

    return DockerEngine()


register("docker", _docker)


def get_engine(name: str = "docker") -> Engine:
    try:
        return _PROVIDERS[name]()
    except KeyError:
        raise BadInput(f"no engine named {name!r} (engines: {', '.join(_PROVIDERS)})") from None


__all__ = ["ContainerSpec", "Engine", "EngineInfo", "Exit", "Mount", "Sandbox", "get_engine",
           "register"]
