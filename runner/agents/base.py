"""What an agent adapter knows: its image, its command line, its environment, and how
to read its own event stream. Everything it parses is `source: agent` (untrusted)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from runner.policy.models import Policy


@dataclass
class AgentContext:
    policy: Policy
    task: list[str]
    model: str | None = None
    endpoints: dict[str, str] = field(default_factory=dict)  # env the services provide
    workspace: str | None = None


@dataclass(frozen=True)
class AgentEvent:
    type: str
    data: dict[str, Any]
    step: bool = False  # a completed agent action, counted toward the steps budget


class Agent(ABC):
    name: str = ""
    image: str = "base"
    # Whether the agent's own exit code is the run's (true for `command`).
    passthrough_exit: bool = False

    @abstractmethod
    def argv(self, ctx: AgentContext) -> list[str]: ...

    def env(self, ctx: AgentContext) -> dict[str, str]:
        return {}

    def parse_line(self, stream: str, line: str) -> list[AgentEvent]:
        """Events in one line of the agent's output (default: none)."""
        return []

    def succeeded(self, exit_code: int) -> bool:
        return exit_code == 0
