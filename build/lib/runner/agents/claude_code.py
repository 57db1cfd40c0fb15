"""`--agent claude-code`: the real Claude Code CLI, headless, inside the sandbox.

What the CLI gets, and why:
- `-p --output-format stream-json --verbose`: one JSON object per line on stdout
  (parsed by runner/agents/claude_code_stream.py); `--verbose` is what makes `-p`
  emit every message rather than only the result. The prompt is a file the shim
  writes, read on stdin (`claude -p` with no prompt argument reads it there): no limit
  on its size (one argv string is capped at 128 KiB), never taken for a flag, and not
  in the process list.
- `--permission-mode dontAsk` with an explicit `--allowedTools`: nothing ever prompts
  (nobody is there to answer), and a tool not on the list is denied rather than run;
  denials show in the result's `permission_denials`. The list is exactly the tools the
  run has: the policy's built-ins and the run's MCP server (`mcp__airlock`, all of its
  tools, which are only the run's). `bypassPermissions` would run the allowed tools the
  same way, but would also approve anything a later CLI version adds that `--tools`
  does not remove; dontAsk fails closed instead. The container, not this list, is the
  boundary: Bash, Read, Edit and Write act on the sandbox only.
- `--tools`: the built-in tools offered to the model at all. Default: Bash, Read,
  Edit, Write, Glob, Grep, NotebookEdit. WebSearch only when the policy permits the
  hosted `web_search` tool (the gateway refuses it otherwise); WebFetch never (in
  gateway mode there is no network to fetch from, and in proxy mode commands reach the
  allowed hosts through HTTPS_PROXY). When the policy lists `provider.tools`, built-ins
  it does not match are dropped, so the CLI never offers what the gateway would refuse.
  `--disallowedTools WebFetch,WebSearch` (unless enabled) as deny rules on top, which
  hold in every permission mode.
- `--strict-mcp-config` always, and `--mcp-config` with only the run's MCP server
  (streamable HTTP on the shim's loopback port, bearer token from the run) when it has
  one: no `.mcp.json` of the workspace, no user or plugin servers.
- `--setting-sources ""`: no user, project or local settings files (the workspace's
  `.claude/settings*.json`, hooks, CLAUDE.md and its skills, agents and commands are not
  read), and `--settings` with a generated JSON (hooks off, bypass mode disabled,
  no attribution lines). `--disable-slash-commands`: no bundled skills or commands.
  `--no-session-persistence`: no transcript written.
- Environment: a fresh config home (`CLAUDE_CONFIG_DIR`) on its own tmpfs, no update
  checks, telemetry, error reporting or other non-essential traffic, no auto-memory,
  no tool search (so the tool list in every request is the whole list). The gateway's
  `ANTHROPIC_BASE_URL` and placeholder key come from the orchestrator; the background
  ("haiku") model is pinned to the run's model, so every request names a model the
  policy allows.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from collections.abc import Sequence
from typing import Any

from runner.agents.base import Agent, AgentContext, AgentEvent
from runner.agents.claude_code_stream import Result, StreamParser
from runner.errors import BadInput
from runner.policy.models import SANDBOX_HOME, Policy

CONFIG_DIR = f"{SANDBOX_HOME}/.claude"
MCP_CONFIG = f"{CONFIG_DIR}/airlock/mcp.json"
PROMPT_FILE = f"{CONFIG_DIR}/airlock/prompt.txt"
MCP_SERVER = "airlock"
DEFAULT_TOOLS = ("Bash", "Read", "Edit", "Write", "Glob", "Grep", "NotebookEdit")
WEB_TOOLS = ("WebFetch", "WebSearch")
PERMISSION_MODE = "dontAsk"

QUIET_ENV = {
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_UPDATES": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
    "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
    "CLAUDE_CODE_DISABLE_CLAUDE_MDS": "1",
    "ENABLE_TOOL_SEARCH": "false",
}

SETTINGS = {
    "disableAllHooks": True,
    "includeCoAuthoredBy": False,
    "permissions": {"disableBypassPermissionsMode": "disable"},
}


def web_search_permitted(policy: Policy) -> bool:
    from runner.gateway.tools import hosted_names

    provider = policy.provider
    if provider is None:
        return False
    return bool(set(provider.hosted_tools) & set(hosted_names("web_search_20250305")))


def builtin_tools(policy: Policy, requested: Sequence[str] | None = None) -> list[str]:
    """The built-in tools a run offers: `requested` or the default, within the policy."""
    tools = list(DEFAULT_TOOLS if requested is None else requested)
    if requested is None and web_search_permitted(policy):
        tools.append("WebSearch")
    allowed = policy.provider.tools if policy.provider is not None else None
    if allowed is not None:
        tools = [t for t in tools if any(fnmatch.fnmatchcase(t, p) for p in allowed)]
    return tools


class ClaudeCodeAgent(Agent):
    name = "claude-code"
    image = "claude-code"
    # The config home gets a tmpfs of its own; HOME and /tmp are the policy's (these
    # sizes apply only when a policy does not mount them itself).
    tmpfs = {CONFIG_DIR: "64m", SANDBOX_HOME: "64m", "/tmp": "256m"}

    def __init__(self, tools: Sequence[str] | None = None) -> None:
        """`tools`: the built-in tools to offer instead of the default set (still
        filtered by the policy's `provider.tools`)."""
        self.requested_tools = None if tools is None else list(tools)
        self.parser = StreamParser()

    # -- configuration -------------------------------------------------------------

    def tools_for(self, ctx: AgentContext) -> list[str]:
        return builtin_tools(ctx.policy, self.requested_tools)

    def allowed_tools(self, ctx: AgentContext) -> list[str]:
        allowed = self.tools_for(ctx)
        if ctx.endpoints.get("AIRLOCK_MCP_URL"):
            allowed.append(f"mcp__{MCP_SERVER}")
        return allowed

    def prompt(self, ctx: AgentContext) -> str:
        prompt = " ".join(ctx.task).strip()
        if not prompt:
            raise BadInput("--agent claude-code needs a prompt after `--`")
        return prompt

    def argv(self, ctx: AgentContext) -> list[str]:
        self.prompt(ctx)
        if "ANTHROPIC_BASE_URL" not in ctx.endpoints:
            raise BadInput("--agent claude-code needs a provider that speaks the Anthropic "
                           "Messages API (policy provider.backend anthropic, vertex or "
                           "gateway, and a network mode other than none)")
        tools = self.tools_for(ctx)
        denied = [t for t in WEB_TOOLS if t not in tools]
        argv = [
            "claude", "-p",
            "--output-format", "stream-json", "--verbose",
            "--permission-mode", PERMISSION_MODE,
            # An empty --tools means "none"; an empty --allowedTools would be read as
            # the next flag, so it is left out when there is nothing to allow.
            "--tools", ",".join(tools),
            "--setting-sources", "",
            "--settings", json.dumps(SETTINGS, separators=(",", ":")),
            "--strict-mcp-config",
            "--disable-slash-commands",
            "--no-session-persistence",
        ]
        allowed = self.allowed_tools(ctx)
        if allowed:
            argv += ["--allowedTools", ",".join(allowed)]
        if denied:
            argv += ["--disallowedTools", ",".join(denied)]
        if ctx.endpoints.get("AIRLOCK_MCP_URL"):
            argv += ["--mcp-config", MCP_CONFIG]
        if ctx.model:
            argv += ["--model", ctx.model]
        return ["/bin/sh", "-c", f'exec "$@" < {shlex.quote(PROMPT_FILE)}', "sh", *argv]

    def env(self, ctx: AgentContext) -> dict[str, str]:
        env = {"CLAUDE_CONFIG_DIR": CONFIG_DIR, **QUIET_ENV}
        if ctx.model:
            # Background calls (titles, summaries) use the "haiku" model unless told
            # otherwise: the run's model, which the policy allows.
            env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] = ctx.model
            env["ANTHROPIC_SMALL_FAST_MODEL"] = ctx.model
        return env

    def mcp_config(self, ctx: AgentContext) -> dict[str, Any]:
        url = ctx.endpoints.get("AIRLOCK_MCP_URL")
        token = ctx.endpoints.get("AIRLOCK_MCP_TOKEN", "")
        servers: dict[str, Any] = {}
        if url:
            servers[MCP_SERVER] = {"type": "http", "url": url,
                                   "headers": {"Authorization": f"Bearer {token}"}}
        return {"mcpServers": servers}

    def files(self, ctx: AgentContext) -> dict[str, str]:
        files = {PROMPT_FILE: self.prompt(ctx)}
        if ctx.endpoints.get("AIRLOCK_MCP_URL"):
            files[MCP_CONFIG] = json.dumps(self.mcp_config(ctx), indent=2)
        return files

    # -- the stream ----------------------------------------------------------------

    def parse_line(self, stream: str, line: str) -> list[AgentEvent]:
        if stream != "stdout":
            return []  # stderr is diagnostics; agent.output already records it
        return self.parser.feed(line)

    @property
    def result(self) -> Result | None:
        return self.parser.result

    def succeeded(self, exit_code: int) -> bool:
        """Exit 0 and a terminal `result` that is not an error; a stream that ends
        without a result is a failure whatever the exit code."""
        result = self.parser.result
        return exit_code == 0 and result is not None and not result.is_error
