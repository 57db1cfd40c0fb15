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
    mcp_tools: list[str] = field(default_factory=list)  # what the run's MCP server exposes


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
    # Whether stdout is the agent's machine-readable event stream (shown to people as
    # parsed events, not raw) rather than output meant for a person (`command`).
    structured_stdout: bool = True
    # Paths this agent must be able to write (home, caches, config home), as tmpfs with
    # their sizes ("256m"); the policy's own tmpfs entries win over these.
    tmpfs: dict[str, str] = {}

    @abstractmethod
    def argv(self, ctx: AgentContext) -> list[str]: ...

    def env(self, ctx: AgentContext) -> dict[str, str]:
        return {}

    def files(self, ctx: AgentContext) -> dict[str, str]:
        """Files the shim writes (mode 0600) before the agent starts: path -> content.

        Paths must be on a tmpfs the sandbox user owns (its home, say): this is how an
        adapter hands its agent a generated configuration and nothing else."""
        return {}

    def parse_line(self, stream: str, line: str) -> list[AgentEvent]:
        """Events in one line of the agent's output (default: none)."""
        return []

    def succeeded(self, exit_code: int) -> bool:
        return exit_code == 0
