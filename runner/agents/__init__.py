"""Agent adapters, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from runner.agents.base import Agent, AgentContext, AgentEvent
from runner.errors import BadInput

_AGENTS: dict[str, Callable[[], Agent]] = {}


def register(name: str, factory: Callable[[], Agent]) -> None:
    _AGENTS[name] = factory


def _command() -> Agent:
    from runner.agents.command import CommandAgent

    return CommandAgent()


register("command", _command)


def agent_names() -> list[str]:
    return sorted(_AGENTS)


def get_agent(name: str) -> Agent:
    try:
        return _AGENTS[name]()
    except KeyError:
        raise BadInput(f"no agent named {name!r} (agents: {', '.join(agent_names())})") from None


__all__ = ["Agent", "AgentContext", "AgentEvent", "agent_names", "get_agent", "register"]
