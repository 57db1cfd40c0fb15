"""`--agent codex`: the real Codex CLI (`codex exec --json`), configured by Airlock alone.

Inside the sandbox Codex finds a fresh tmpfs `CODEX_HOME` whose only file is the
configuration generated for this run (runner/agents/codex_config.py): approvals never,
its own sandbox bypassed (the container is the sandbox), web search off, the gateway as
its only model provider, the run's MCP server as its only MCP server, and everything
that would load more (user/system config, rules, AGENTS.md, skills, hooks, plugins,
apps, other agents) off. `--strict-config` makes a key this Codex does not know an error.

Its JSONL stream is parsed into `agent.*` events (untrusted, `source: agent`) by
runner/agents/codex_events.py; every completed action counts as a step as it happens.
"""

from __future__ import annotations

from typing import Any

from runner.agents.base import Agent, AgentContext, AgentEvent
from runner.agents.codex_config import generate, to_toml
from runner.agents.codex_events import CodexStream
from runner.errors import BadInput
from runner.policy.models import SANDBOX_HOME, WORKSPACE_PATH

CODEX_HOME = f"{SANDBOX_HOME}/.codex"
CONFIG_PATH = f"{CODEX_HOME}/config.toml"


class CodexAgent(Agent):
    name = "codex"
    image = "codex"
    # HOME and CODEX_HOME are both private tmpfs mounts: nothing of the host's (or of an
    # earlier run's) Codex state can be there, and nothing written there outlives the run.
    tmpfs = {SANDBOX_HOME: "64m", CODEX_HOME: "128m"}

    def __init__(self, overrides: dict[str, Any] | None = None) -> None:
        """`overrides`: configuration keys merged over the generated ones (tests only:
        this is how a test asks Codex for what the gateway must then refuse)."""
        self.overrides = dict(overrides or {})
        self.stream = CodexStream()

    # -- what runs -----------------------------------------------------------------------

    def prompt(self, ctx: AgentContext) -> str:
        text = " ".join(ctx.task).strip()
        if not text:
            raise BadInput("--agent codex needs a prompt")
        return text

    def argv(self, ctx: AgentContext) -> list[str]:
        self.stream = CodexStream()  # a fresh state machine per run
        cwd = WORKSPACE_PATH if ctx.workspace else SANDBOX_HOME
        argv = [
            "codex", "exec", "--json",
            "--strict-config",  # an unknown or stale key fails the run loudly
            "--ignore-rules",  # no execpolicy .rules (they can only allow more)
            "--skip-git-repo-check",
            # Codex's own bubblewrap sandbox cannot start in a hardened container; the
            # container is the sandbox. Explicit, as the CLI's help says: "intended
            # solely for running in environments that are externally sandboxed".
            "--dangerously-bypass-approvals-and-sandbox",
            "--color", "never",
            "-C", cwd,
        ]
        if ctx.model:
            argv += ["--model", ctx.model]
        return [*argv, "--", self.prompt(ctx)]

    def env(self, ctx: AgentContext) -> dict[str, str]:
        return {"CODEX_HOME": CODEX_HOME, "HOME": SANDBOX_HOME, "RUST_LOG": "error",
                "NO_COLOR": "1"}

    def config(self, ctx: AgentContext) -> dict[str, Any]:
        base_url = ctx.endpoints.get("OPENAI_BASE_URL")
        if not base_url:
            raise BadInput("--agent codex speaks the OpenAI Responses API: the policy needs a "
                           "provider with backend openai, openai-compatible or ollama "
                           "(or a replay of one) and network mode gateway or proxy")
        # Only the tools the run's server exposes are enabled (and approved), by name.
        cfg = generate(model=ctx.model, base_url=base_url,
                       mcp_url=ctx.endpoints.get("AIRLOCK_MCP_URL"),
                       mcp_tools=list(ctx.mcp_tools),
                       workspace=WORKSPACE_PATH if ctx.workspace else None)
        return _merge(cfg, self.overrides)

    def files(self, ctx: AgentContext) -> dict[str, str]:
        return {CONFIG_PATH: to_toml(self.config(ctx))}

    # -- what it says --------------------------------------------------------------------

    def parse_line(self, stream: str, line: str) -> list[AgentEvent]:
        if stream != "stdout":
            return []  # logs: recorded as agent.output, never parsed as events
        return self.stream.feed(line)

    def succeeded(self, exit_code: int) -> bool:
        """A terminal `turn.completed` (and no failure after it) and exit 0. An interrupted
        turn ends the stream with no terminal event at all: that is a failure."""
        return exit_code == 0 and self.stream.completed


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
