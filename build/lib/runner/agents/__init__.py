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


def _lazy(module: str, cls: str) -> Callable[[], Agent]:
    def make() -> Agent:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                raise BadInput(f"agent adapter {module} is not part of this installation") from None
            raise
        agent: Agent = getattr(mod, cls)()
        return agent

    return make


register("command", _command)
register("builtin", _lazy("runner.agents.builtin", "BuiltinAgent"))
register("codex", _lazy("runner.agents.codex", "CodexAgent"))
register("claude-code", _lazy("runner.agents.claude_code", "ClaudeCodeAgent"))


def agent_names() -> list[str]:
    return sorted(_AGENTS)


def get_agent(name: str) -> Agent:
    try:
        return _AGENTS[name]()
    except KeyError:
        raise BadInput(f"no agent named {name!r} (agents: {', '.join(agent_names())})") from None


__all__ = ["Agent", "AgentContext", "AgentEvent", "agent_names", "get_agent", "register"]
