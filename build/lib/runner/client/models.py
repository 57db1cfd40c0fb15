"""What the service answers (DESIGN.md, "The service"), as pydantic models.

Models accept fields they do not know: a newer service may say more than this client
reads, and that must not break it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RunStatus = Literal["queued", "running", "succeeded", "failed", "budget", "timeout",
                    "cancelled", "lost"]
ENDED = frozenset({"succeeded", "failed", "budget", "timeout", "cancelled", "lost"})

# The exit code of a run that ended without one of its own (never started, lost...),
# the same as a local `airlock run` would give for that end.
_STATUS_EXIT = {"succeeded": 0, "failed": 1, "budget": 4, "timeout": 124, "cancelled": 130,
                "lost": 3}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class RunCreated(_Open):
    id: str
    status: RunStatus


class RunInfo(_Open):
    id: str
    status: RunStatus
    exit_code: int | None = None
    exit_reason: str | None = None
    usage: dict[str, Any] = Field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @property
    def cli_exit_code(self) -> int:
        """The exit code a local `airlock run` gives for this end."""
        if self.exit_code is not None:
            return self.exit_code
        return _STATUS_EXIT.get(self.status, 1)


class RunEvent(_Open):
    seq: int
    ts: float
    run_id: str
    type: str
    source: str
    prev: str = ""
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def trusted(self) -> bool:
        return self.source != "agent"
