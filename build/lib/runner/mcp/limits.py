"""Whether one more tool call may run: the run's `mcp_calls` budget, then the tool's own cap."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from runner.events.budgets import Budgets


@dataclass(frozen=True)
class Refusal:
    reason: str  # "budget" | "per_tool_cap" | "not_exposed"
    message: str  # what the agent is told
    limit: int | None = None


class CallGate:
    def __init__(self, budgets: Budgets, per_tool: Mapping[str, int]) -> None:
        self._budgets = budgets
        self._per_tool = dict(per_tool)
        self._served: Counter[str] = Counter()

    def admit(self, tool: str) -> Refusal | None:
        """Charge one call and decide. Every request counts against the run's budget, refused
        ones too, so an agent looping on a capped or unknown tool still runs out."""
        if not self._budgets.charge("mcp_calls", source="mcp"):
            # False once any budget of the run has tripped: Budgets has recorded the event
            # and called on_exceeded (the orchestrator ends the run); calls stop here.
            return Refusal("budget", "the run's budget is exhausted; no more tool calls",
                           self._budgets.limits.get("mcp_calls"))
        cap = self._per_tool.get(tool)
        if cap is not None and self._served[tool] >= cap:
            return Refusal("per_tool_cap", f"{tool} may be called at most {cap} times in this run",
                           cap)
        # Counted on admission, not completion: concurrent calls cannot slip past the cap.
        self._served[tool] += 1
        return None
