"""`--agent builtin`: Airlock's own tool-use loop (runner/sandbox/agent_loop.py).

It runs in the `builtin` image with the official SDKs and speaks the API of the
policy's provider through the gateway: Anthropic Messages for `anthropic`, `vertex` and
`gateway`; OpenAI Responses for `openai`; Chat Completions for `openai-compatible`;
Ollama's `/api/chat` for `ollama`; for `replay`, whatever the recording was made with.
`BuiltinAgent(api="chat")` (the Python API) overrides the choice.

Its stdout is one JSON object per line (`"airlock_agent": 1`), parsed here into events
(all `source: agent`, untrusted):

  agent.start      the loop's tools, model, API and max steps
  agent.usage      one per model response: tokens, stop reason, number of tool calls
  agent.message    assistant text; `final: true` is the answer (a turn with no tool: a step)
  agent.tool_start a tool about to run (its name and arguments)
  agent.tool_call  a tool call with its outcome (`ok`, `error`, exit code, output): a step
  agent.error      a provider, MCP or internal error
  agent.end        how the loop ended (completed, max_steps, error) with its totals
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.agents.base import Agent, AgentContext, AgentEvent
from runner.errors import BadInput
from runner.gateway.record import Replayer, ReplayError
from runner.policy.models import SANDBOX_HOME, WORKSPACE_PATH

LOOP = "/opt/airlock/airlock_sandbox/agent_loop.py"
APIS = ("anthropic", "responses", "chat", "ollama")
BACKEND_API = {"anthropic": "anthropic", "vertex": "anthropic", "gateway": "anthropic",
               "openai": "responses", "openai-compatible": "chat", "ollama": "ollama"}
DEFAULT_MAX_STEPS = 200  # the loop's own safety net when the policy sets no step budget
FIELD_CAP = 4000  # characters of one string field of an agent event
VALUE_CAP = 8000  # characters of one structured field, serialized
TYPES = {"start": "agent.start", "turn": "agent.usage", "message": "agent.message",
         "tool_start": "agent.tool_start", "tool_call": "agent.tool_call",
         "error": "agent.error", "end": "agent.end"}
RESERVED = frozenset({"airlock_agent", "type", "source", "seq", "ts", "run_id", "prev"})


def api_for(ctx: AgentContext) -> str:
    """The API the loop speaks, from the policy's provider backend."""
    provider = ctx.policy.provider
    if provider is None or ctx.policy.network.mode == "none":
        raise BadInput("--agent builtin needs a model provider: the policy needs a `provider` "
                       "and network mode gateway or proxy")
    backend: str = provider.backend
    if backend == "replay":
        assert provider.replay_file is not None  # the policy model requires it
        try:
            backend = Replayer(Path(provider.replay_file).expanduser()).backend
        except ReplayError as exc:
            raise BadInput(str(exc)) from None
    if backend not in BACKEND_API:
        raise BadInput(f"--agent builtin cannot speak to provider backend {backend!r}")
    return BACKEND_API[backend]


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= FIELD_CAP else value[:FIELD_CAP] + "...[cut]"
    if isinstance(value, bool | int | float) or value is None:
        return value
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)[:FIELD_CAP]
    return value if len(text) <= VALUE_CAP else text[:VALUE_CAP] + "...[cut]"


class BuiltinAgent(Agent):
    name = "builtin"
    image = "builtin"

    def __init__(self, api: str | None = None) -> None:
        if api is not None and api not in APIS:
            raise BadInput(f"the builtin agent speaks {', '.join(APIS)}, not {api!r}")
        self.api = api
        self.ended: str | None = None  # the status of the loop's `end` line

    def argv(self, ctx: AgentContext) -> list[str]:
        prompt = " ".join(ctx.task).strip()
        if not prompt:
            raise BadInput("--agent builtin needs a prompt")
        self.ended = None
        fs = ctx.policy.filesystem
        writable = sorted(fs.tmpfs)
        if ctx.workspace and fs.workspace in ("copy", "rw"):
            writable.insert(0, WORKSPACE_PATH)
        steps = ctx.policy.budgets.steps
        # One past the host's budget: the host sees the step that exceeds it and ends the
        # run with its own status; the loop stops by itself only if that never happens.
        max_steps = steps + 1 if steps else DEFAULT_MAX_STEPS
        api = api_for(ctx)  # also checks that the run has a provider at all
        argv = ["python3", "-I", LOOP, "--api", self.api or api, "--max-steps", str(max_steps)]
        if ctx.model:
            argv += ["--model", ctx.model]
        for path in writable:
            argv += ["--writable", path]
        return [*argv, "--", prompt]

    def env(self, ctx: AgentContext) -> dict[str, str]:
        return {"HOME": SANDBOX_HOME, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}

    def parse_line(self, stream: str, line: str) -> list[AgentEvent]:
        if stream != "stdout" or not line.startswith("{"):
            return []  # stderr is logs: recorded as agent.output, never parsed
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # malformed, or nested past the parser
            return []
        if not isinstance(obj, dict) or obj.get("airlock_agent") != 1:
            return []
        kind = obj.get("type")
        etype = TYPES.get(kind) if isinstance(kind, str) else None
        data = {k: _clean(v) for k, v in obj.items() if k not in RESERVED and isinstance(k, str)}
        if etype is None:
            return [AgentEvent("agent.unknown", {"kind": _clean(str(kind)), **data})]
        if kind == "turn":
            raw_usage = obj.get("usage")
            usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
            data.pop("usage", None)
            for key in ("input_tokens", "output_tokens", "cache_read_tokens",
                        "cache_write_tokens"):
                value = usage.get(key)
                data[key] = value if isinstance(value, int) else 0
        if kind == "end":
            self.ended = str(obj.get("status"))
        step = kind == "tool_call" or (kind == "message" and obj.get("final") is True)
        return [AgentEvent(etype, data, step=step)]

    def succeeded(self, exit_code: int) -> bool:
        """Exit 0 and the loop's own `end` line saying it completed."""
        return exit_code == 0 and self.ended == "completed"
