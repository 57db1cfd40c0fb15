"""The HTTP API's requests and responses; `/openapi.json` is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AgentName = Literal["command", "builtin", "codex", "claude-code"]
RunStatus = Literal["queued", "running", "succeeded", "failed", "budget", "timeout",
                    "cancelled", "lost"]

MAX_TASK_CHARS = 256 << 10
MAX_ARGS = 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunRequest(_Request):
    """A run to queue. `command` for the command agent, `task` for the others."""

    agent: AgentName = "command"
    command: Annotated[list[Annotated[str, Field(max_length=64 << 10)]],
                       Field(min_length=1, max_length=MAX_ARGS)] | None = Field(
        None, description="argv of the command agent's command.")
    task: str | None = Field(None, min_length=1, max_length=MAX_TASK_CHARS,
                             description="The prompt, for builtin, codex and claude-code.")
    model: str | None = Field(None, max_length=256,
                              description="A role, alias or model id the policy allows.")
    policy: dict[str, Any] | str | None = Field(
        None, description="A policy document (object or YAML text) applied on top of the "
        "tenant's floor; it may only tighten it.")
    workspace: str | None = Field(None, max_length=4096,
                                  description="A directory under the tenant's workspaces root.")
    image: Literal["base", "builtin", "codex", "claude-code"] | None = Field(
        None, description="The Airlock image the command agent runs in (default: base).")

    @model_validator(mode="after")
    def _what_to_run(self) -> RunRequest:
        if self.agent == "command":
            if not self.command:
                raise ValueError("agent command needs `command` (a list of arguments)")
            if self.task is not None:
                raise ValueError("agent command takes `command`, not `task`")
        else:
            if not self.task:
                raise ValueError(f"agent {self.agent} needs `task`")
            if self.command is not None:
                raise ValueError(f"agent {self.agent} takes `task`, not `command`")
            if self.image is not None:
                raise ValueError("`image` applies to agent command only")
        return self


class RunCreated(BaseModel):
    id: str
    status: RunStatus


class RunInfo(BaseModel):
    id: str
    status: RunStatus
    exit_code: int | None
    exit_reason: str | None
    usage: dict[str, float]
    agent: str | None = None
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None


class RunList(BaseModel):
    runs: list[RunInfo]
    next: str | None = Field(None, description="Pass as `cursor` for the next page.")


class Usage(BaseModel):
    tenant: str
    since: str | None = Field(None, description="First UTC day counted (YYYY-MM-DD), or all time.")
    totals: dict[str, float]
    by_day: dict[str, dict[str, float]]
    active: dict[str, int] = Field(description="Runs queued and running now.")
    quota: dict[str, int | None]


class Health(BaseModel):
    status: Literal["ok", "draining"]
    host: str
    running: int
    capacity: int


class Error(BaseModel):
    error: str


class HostInfo(BaseModel):
    host_id: str
    address: str | None
    alive: bool
    heartbeat_at: float
    expires_at: float


class Hosts(BaseModel):
    hosts: list[HostInfo]
