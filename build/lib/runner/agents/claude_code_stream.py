"""Claude Code's `--output-format stream-json` (NDJSON on stdout) as Airlock events.

One object per line (see ../shared/research/claude-code-and-srt.md, section 2.4):
`system` (subtype `init` first, then `status`, `compact_boundary`, `task_*`, `hook_*`,
...), `assistant` (one message's content blocks: text, thinking, tool_use, server tool
use; one line per block in this version, several lines sharing a message id), `user`
(tool results, with a structured `tool_use_result`), `stream_event` (only with
--include-partial-messages), `rate_limit_event`, and one terminal `result` with usage,
cost, number of turns and `is_error`. Types and fields this parser does not know are
accepted and recorded, never an error: the CLI adds them often.

Steps (the `steps` budget, charged live by the orchestrator): every completed tool use
is one, whatever the tool (a command, a file change, an MCP call, a read, a search, a
denied call), counted when its result arrives; an assistant turn that used no tool is
one, counted when the turn is known to be over (the next turn or message of the same
conversation thread, or the result). Sub-agent traffic (`parent_tool_use_id` set)
counts the same way in its own thread.

Everything here comes from the agent and is untrusted: values are copied with caps on
their size, and nothing in them changes what the host does except the step count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from runner.agents.base import AgentEvent

TEXT_CAP = 4000  # characters of a message, command output or tool result kept per event
INPUT_CAP = 2000  # characters of a tool input (JSON) kept per event
LINE_CAP = 500  # characters of an unparsable line kept
COMMAND_TOOLS = frozenset({"Bash", "BashOutput", "KillShell", "PowerShell"})
FILE_TOOLS = frozenset({"Edit", "MultiEdit", "Write", "NotebookEdit"})


def _cap(text: Any, limit: int = TEXT_CAP) -> str:
    s = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False, default=str)
    return s if len(s) <= limit else s[:limit] + f"... [{len(s) - limit} more]"


def _capped_input(value: Any) -> Any:
    """A tool input as is when small, else its JSON cut to INPUT_CAP characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return value if len(text) <= INPUT_CAP else _cap(text, INPUT_CAP)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _result_text(content: Any) -> str:
    """The text of a tool_result's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if block.get("type") == "text":
                    parts.append(str(block.get("text", "")))
                else:
                    parts.append(f"[{block.get('type', 'block')}]")
            else:
                parts.append(str(block))
        return "\n".join(parts)
    return "" if content is None else str(content)


def mcp_parts(name: str) -> tuple[str, str]:
    """`mcp__<server>__<tool>` -> (server, tool)."""
    _, _, rest = name.partition("mcp__")
    server, _, tool = rest.partition("__")
    return server, tool


def tool_kind(name: str) -> str:
    if name in COMMAND_TOOLS:
        return "command"
    if name in FILE_TOOLS:
        return "file_change"
    if name.startswith("mcp__"):
        return "mcp"
    return "tool"


@dataclass
class Result:
    subtype: str | None
    is_error: bool
    data: dict[str, Any]


@dataclass
class _Turn:
    message_id: str
    used_tool: bool = False


@dataclass
class StreamParser:
    """Turns lines of one run's stream into events; remembers what it needs across lines."""

    result: Result | None = None
    session_id: str | None = None
    lines: int = 0
    unknown_types: set[str] = field(default_factory=set)
    _pending: dict[str, tuple[str, Any]] = field(default_factory=dict)  # tool_use id -> name, input
    _turns: dict[str | None, _Turn] = field(default_factory=dict)  # thread -> its open turn

    def feed(self, line: str) -> list[AgentEvent]:
        line = line.strip()
        if not line:
            return []
        self.lines += 1
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return [AgentEvent("agent.unparsed", {"line": _cap(line, LINE_CAP)})]
        if not isinstance(obj, dict):
            return [AgentEvent("agent.unparsed", {"line": _cap(line, LINE_CAP)})]
        kind = obj.get("type")
        handler = {
            "system": self._system,
            "assistant": self._assistant,
            "user": self._user,
            "result": self._result,
            "stream_event": self._stream_event,
            "rate_limit_event": self._rate_limit,
        }.get(kind if isinstance(kind, str) else "")
        if handler is None:
            self.unknown_types.add(str(kind))
            data: dict[str, Any] = {"type": _cap(str(kind), 100)}
            if isinstance(obj.get("subtype"), str):
                data["subtype"] = obj["subtype"][:100]
            return [AgentEvent("agent.event", data)]
        return handler(obj)

    # -- turns -----------------------------------------------------------------------

    def _close_turn(self, thread: str | None) -> list[AgentEvent]:
        turn = self._turns.pop(thread, None)
        if turn is None or turn.used_tool:
            return []
        data: dict[str, Any] = {"kind": "turn", "message_id": turn.message_id}
        if thread is not None:
            data["parent_tool_use_id"] = thread
        return [AgentEvent("agent.step", data, step=True)]

    def _close_all_turns(self) -> list[AgentEvent]:
        out: list[AgentEvent] = []
        for thread in list(self._turns):
            out += self._close_turn(thread)
        return out

    # -- line types ------------------------------------------------------------------

    def _system(self, obj: dict[str, Any]) -> list[AgentEvent]:
        subtype = obj.get("subtype")
        if subtype == "init":
            self.session_id = obj.get("session_id") if isinstance(obj.get("session_id"), str) \
                else None
            servers = [{"name": s.get("name"), "status": s.get("status")}
                       for s in obj.get("mcp_servers") or [] if isinstance(s, dict)]
            return [AgentEvent("agent.init", {
                "session_id": self.session_id,
                "model": obj.get("model"),
                "version": obj.get("claude_code_version"),
                "cwd": obj.get("cwd"),
                "tools": [str(t) for t in obj.get("tools") or []],
                "mcp_servers": servers,
                "permission_mode": obj.get("permissionMode"),
                "api_key_source": obj.get("apiKeySource"),
            })]
        # Other subtypes (status, compact_boundary, task_*, hook_*, api_retry, ...): the
        # subtype and the small scalar fields, which is what they carry.
        data: dict[str, Any] = {"subtype": _cap(str(subtype), 100)}
        for key, value in obj.items():
            if key in ("type", "subtype", "uuid", "session_id"):
                continue
            if isinstance(value, bool | int | float) or value is None:
                data[key] = value
            elif isinstance(value, str):
                data[key] = _cap(value, 500)
        return [AgentEvent("agent.system", data)]

    def _assistant(self, obj: dict[str, Any]) -> list[AgentEvent]:
        message = _dict(obj.get("message"))
        thread = obj.get("parent_tool_use_id") if isinstance(obj.get("parent_tool_use_id"),
                                                             str) else None
        msg_id = str(message.get("id") or obj.get("uuid") or "")
        out: list[AgentEvent] = []
        turn = self._turns.get(thread)
        if turn is None or turn.message_id != msg_id:
            out += self._close_turn(thread)
            turn = self._turns[thread] = _Turn(msg_id)
        base: dict[str, Any] = {"message_id": msg_id}
        if thread is not None:
            base["parent_tool_use_id"] = thread
        if obj.get("error"):  # authentication_failed, rate_limit, server_error, ...
            out.append(AgentEvent("agent.error", {**base, "kind": "api",
                                                  "error": _cap(str(obj["error"]), 200)}))
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            btype = block.get("type")
            if btype == "text":
                out.append(AgentEvent("agent.message",
                                      {**base, "text": _cap(block.get("text", ""))}))
            elif btype in ("thinking", "redacted_thinking"):
                out.append(AgentEvent("agent.reasoning", {
                    **base, "text": _cap(block.get("thinking", ""))}))
            elif btype == "tool_use":
                turn.used_tool = True
                tool_id, name = str(block.get("id", "")), str(block.get("name", ""))
                self._pending[tool_id] = (name, block.get("input"))
                call: dict[str, Any] = {**base, "id": tool_id, "name": name,
                                        "kind": tool_kind(name),
                                        "input": _capped_input(block.get("input"))}
                if name.startswith("mcp__"):
                    call["server"], call["tool"] = mcp_parts(name)
                out.append(AgentEvent("agent.tool_call", call))
            elif isinstance(btype, str) and btype.endswith("tool_use"):
                # Provider-side tools (server_tool_use, web_search_tool_use, ...): they run
                # at the provider, which the gateway only lets happen if the policy names
                # them. Recorded, and a turn that used one is not "without a tool".
                turn.used_tool = True
                out.append(AgentEvent("agent.server_tool", {
                    **base, "id": str(block.get("id", "")), "name": str(block.get("name", "")),
                    "input": _capped_input(block.get("input"))}))
            else:
                out.append(AgentEvent("agent.content", {**base, "type": _cap(str(btype), 100)}))
        return out

    def _user(self, obj: dict[str, Any]) -> list[AgentEvent]:
        message = _dict(obj.get("message"))
        thread = obj.get("parent_tool_use_id") if isinstance(obj.get("parent_tool_use_id"),
                                                             str) else None
        out = self._close_turn(thread)
        content = message.get("content")
        structured = obj.get("tool_use_result")
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"] \
            if isinstance(content, list) else []
        for block in results:
            out.append(self._completed(block, structured if len(results) == 1 else None, thread))
        if not results:
            # A user turn without tool results (a prompt in streaming-input mode, a
            # replayed message, a sub-agent's task): noted, nothing to count.
            out.append(AgentEvent("agent.user", {"text": _cap(_result_text(content), 500)}))
        return out

    def _completed(self, block: dict[str, Any], structured: Any,
                   thread: str | None) -> AgentEvent:
        tool_id = str(block.get("tool_use_id", ""))
        name, tool_input = self._pending.pop(tool_id, ("", None))
        ok = not bool(block.get("is_error"))
        text = _result_text(block.get("content"))
        data: dict[str, Any] = {"id": tool_id, "name": name, "ok": ok}
        if thread is not None:
            data["parent_tool_use_id"] = thread
        inp = tool_input if isinstance(tool_input, dict) else {}
        info = structured if isinstance(structured, dict) else {}
        kind = tool_kind(name)
        if kind == "command":
            data["command"] = _cap(inp.get("command", ""), INPUT_CAP)
            data["output"] = _cap(text)
            if isinstance(info.get("interrupted"), bool):
                data["interrupted"] = info["interrupted"]
            return AgentEvent("agent.command", data, step=True)
        if kind == "file_change":
            data["path"] = str(info.get("filePath") or inp.get("file_path")
                               or inp.get("notebook_path") or "")
            data["change"] = str(info.get("type") or ("edit" if name != "Write" else "write"))
            if not ok:
                data["error"] = _cap(text, 1000)
            return AgentEvent("agent.file_change", data, step=True)
        if kind == "mcp":
            data["server"], data["tool"] = mcp_parts(name)
            data["output"] = _cap(text)
            return AgentEvent("agent.mcp_call", data, step=True)
        data["output"] = _cap(text)
        return AgentEvent("agent.tool_result", data, step=True)

    def _result(self, obj: dict[str, Any]) -> list[AgentEvent]:
        out = self._close_all_turns()
        is_error = obj.get("is_error") is not False  # absent or anything but false: an error
        subtype = obj.get("subtype") if isinstance(obj.get("subtype"), str) else None
        denials = [{"tool_name": d.get("tool_name"), "tool_use_id": d.get("tool_use_id")}
                   for d in obj.get("permission_denials") or [] if isinstance(d, dict)]
        data: dict[str, Any] = {
            "subtype": subtype,
            "is_error": is_error,
            "num_turns": obj.get("num_turns"),
            "duration_ms": obj.get("duration_ms"),
            "duration_api_ms": obj.get("duration_api_ms"),
            "total_cost_usd": obj.get("total_cost_usd"),
            "usage": obj.get("usage") if isinstance(obj.get("usage"), dict) else None,
            "model_usage": obj.get("modelUsage") if isinstance(obj.get("modelUsage"), dict)
            else None,
            "permission_denials": denials,
            "stop_reason": obj.get("stop_reason"),
            "terminal_reason": obj.get("terminal_reason"),
            "session_id": obj.get("session_id"),
            "result": _cap(obj.get("result") or ""),
        }
        for key in ("errors", "api_error_status"):
            if obj.get(key) is not None:
                data[key] = obj[key] if key != "errors" else _capped_input(obj[key])
        self.result = Result(subtype, is_error, data)
        out.append(AgentEvent("agent.result", data))
        if is_error:
            out.append(AgentEvent("agent.error", {
                "kind": "result", "subtype": subtype,
                "error": _cap(obj.get("result") or subtype or "error", 1000)}))
        return out

    def _stream_event(self, obj: dict[str, Any]) -> list[AgentEvent]:
        event = _dict(obj.get("event"))
        return [AgentEvent("agent.stream", {"event": _cap(str(event.get("type")), 100)})]

    def _rate_limit(self, obj: dict[str, Any]) -> list[AgentEvent]:
        info = _dict(obj.get("rate_limit_info"))
        return [AgentEvent("agent.rate_limit", {
            k: info.get(k) for k in ("status", "resetsAt", "rateLimitType", "utilization")
            if k in info})]
