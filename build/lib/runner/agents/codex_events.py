"""Codex's `exec --json` stream as Airlock events.

The stream (Codex 0.163, `codex-rs/exec/src/exec_events.rs`) is one JSON object per
line: `thread.started`, `turn.started`, `item.started|updated|completed` carrying a
`ThreadItem`, `turn.completed` (with usage), `turn.failed`, and `error`. Everything it
says is the agent's own account (`source: agent`, untrusted); the gateway's and the
MCP server's events are the authoritative ones.

The parser is lenient on purpose: unknown event types, unknown item types and extra
fields become generic events instead of errors, and a line that is not JSON is left to
the raw `agent.output` record. `error: null` on an item is a success (the SDK writes it
on every successful MCP call); only `status: failed` or a populated error object is a
failure.

Steps: every completed agent action (a command, an MCP call, a file change, a web
search, a call to another agent) is one step, charged the moment its `item.completed`
arrives; a turn that ended without any action counts as one step itself.
"""

from __future__ import annotations

import json
import re
from typing import Any

from runner.agents.base import AgentEvent

# Item types that are actions of the agent; each completed one is a step.
ACTION_ITEMS = {
    "command_execution": "agent.command",
    "mcp_tool_call": "agent.mcp_call",
    "file_change": "agent.file_change",
    "web_search": "agent.web_search",
    "collab_tool_call": "agent.collab_call",
}
# Item types that are what the agent said or planned.
OTHER_ITEMS = {
    "agent_message": "agent.message",
    "reasoning": "agent.reasoning",
    "todo_list": "agent.todo_list",
    "error": "agent.error",
}
TEXT_CAP = 8192  # characters of command output or message text kept in one event
# What a command prints when Codex's own sandbox was wrongly left on (openai/codex#46246).
INNER_SANDBOX = re.compile(r"bwrap:|LandlockRestrict|No permissions to create a new namespace")
USAGE_KEYS = ("input_tokens", "cached_input_tokens", "cache_write_input_tokens",
              "output_tokens", "reasoning_output_tokens")


def _cap(text: Any, cap: int = TEXT_CAP) -> tuple[str, bool]:
    s = text if isinstance(text, str) else ("" if text is None else str(text))
    return (s, False) if len(s) <= cap else (s[:cap], True)


def _error_message(err: Any) -> str | None:
    """The message of an error field, or None when there is no error (absent or null)."""
    if err is None or err == {} or err == "":
        return None
    if isinstance(err, dict):
        msg = err.get("message")
        return str(msg) if msg else json.dumps(err)[:1000]
    return str(err)[:1000]


class CodexStream:
    """The state of one `codex exec --json` stream: feed it lines, get events."""

    def __init__(self) -> None:
        self.thread_id: str | None = None
        self.terminal: str | None = None  # "completed" | "failed" for the last turn
        self.turns = 0
        self.steps = 0
        self.usage: dict[str, int] = {}
        self.failure: str | None = None
        self._turn_actions = 0
        self._counted: set[str] = set()
        self.unknown: set[str] = set()

    @property
    def completed(self) -> bool:
        """The last turn ended with `turn.completed`."""
        return self.terminal == "completed"

    # -- lines ---------------------------------------------------------------------------

    def feed(self, line: str) -> list[AgentEvent]:
        line = line.strip()
        if not line.startswith("{"):
            return []
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return []
        if not isinstance(obj, dict):
            return []
        return self.event(obj)

    def event(self, obj: dict[str, Any]) -> list[AgentEvent]:
        etype = obj.get("type")
        if etype == "thread.started":
            self.thread_id = str(obj.get("thread_id") or "") or None
            return [AgentEvent("agent.session", {"thread_id": self.thread_id})]
        if etype == "turn.started":
            self.turns += 1
            self.terminal = None
            self._turn_actions = 0
            return [AgentEvent("agent.turn.started", {"turn": self.turns})]
        if etype == "turn.completed":
            return self._turn_end("completed", obj)
        if etype == "turn.failed":
            return self._turn_end("failed", obj)
        if etype == "error":
            # A stream- or thread-level error; Codex may still retry, so it is recorded
            # and the outcome is left to the terminal event and the exit code.
            msg, _ = _cap(obj.get("message"), 2000)
            return [AgentEvent("agent.error", {"scope": "stream", "message": msg,
                                               "fatal": False})]
        if etype in ("item.started", "item.updated", "item.completed"):
            item = obj.get("item")
            if isinstance(item, dict):
                return self._item(str(etype).split(".", 1)[1], item)
        self.unknown.add(str(etype))
        return [AgentEvent("agent.event", {"event_type": str(etype), "raw": obj})]

    # -- turns ---------------------------------------------------------------------------

    def _turn_end(self, outcome: str, obj: dict[str, Any]) -> list[AgentEvent]:
        self.terminal = outcome
        out: list[AgentEvent] = []
        data: dict[str, Any] = {"turn": self.turns, "actions": self._turn_actions}
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = {k: int(v) for k, v in usage.items()
                          if isinstance(v, int) and not isinstance(v, bool)}
            data["usage"] = self.usage
        if outcome == "failed":
            self.failure = _error_message(obj.get("error")) or "turn failed"
            data["error"] = self.failure
        out.append(AgentEvent(f"agent.turn.{outcome}", data))
        if isinstance(usage, dict):
            # Codex's cumulative thread total (not a per-turn delta); the gateway's
            # provider.request events are what the token budget is charged from.
            out.append(AgentEvent("agent.usage", {k: self.usage.get(k, 0) for k in USAGE_KEYS}
                                  | {k: v for k, v in self.usage.items()
                                     if k not in USAGE_KEYS}))
        if self._turn_actions == 0:
            self.steps += 1
            out.append(AgentEvent("agent.step", {"kind": "turn", "turn": self.turns,
                                                 "outcome": outcome, "step": self.steps},
                                  step=True))
        return out

    # -- items ---------------------------------------------------------------------------

    def _item(self, phase: str, item: dict[str, Any]) -> list[AgentEvent]:
        itype = str(item.get("type") or item.get("item_type") or "")
        iid = str(item.get("id") or "")
        base: dict[str, Any] = {"phase": phase, "id": iid}
        if itype in ACTION_ITEMS:
            data = base | self._action_fields(itype, item)
            if phase != "completed":
                data["ok"] = None
            step = False
            if phase == "completed" and (not iid or iid not in self._counted):
                if iid:
                    self._counted.add(iid)
                self._turn_actions += 1
                self.steps += 1
                data["step"] = self.steps
                step = True
            out = [AgentEvent(ACTION_ITEMS[itype], data, step=step)]
            if itype == "command_execution" and phase == "completed" and not data["ok"] \
                    and INNER_SANDBOX.search(data.get("output") or ""):
                out.append(AgentEvent("agent.error", {
                    "scope": "inner_sandbox", "fatal": False, "id": iid,
                    "message": "a command failed in Codex's own sandbox, which should be "
                               "bypassed inside Airlock"}))
            return out
        if itype in OTHER_ITEMS:
            return [AgentEvent(OTHER_ITEMS[itype], base | self._other_fields(itype, item))]
        self.unknown.add(f"item:{itype}")
        return [AgentEvent("agent.item", base | {"item_type": itype, "raw": item})]

    @staticmethod
    def _status_ok(item: dict[str, Any]) -> tuple[str | None, bool, str | None]:
        status = item.get("status")
        status = str(status) if status is not None else None
        error = _error_message(item.get("error"))
        ok = status not in ("failed", "declined") and error is None
        return status, ok, error

    def _action_fields(self, itype: str, item: dict[str, Any]) -> dict[str, Any]:
        status, ok, error = self._status_ok(item)
        d: dict[str, Any] = {"status": status}
        if itype == "command_execution":
            output, truncated = _cap(item.get("aggregated_output"))
            code = item.get("exit_code")
            d |= {"command": item.get("command"), "exit_code": code,
                  "output": output, "output_truncated": truncated}
            if isinstance(code, int) and code != 0 and status != "in_progress":
                ok = False
        elif itype == "mcp_tool_call":
            d |= {"server": item.get("server"), "tool": item.get("tool"),
                  "arguments": item.get("arguments")}
            result = item.get("result")
            if isinstance(result, dict):
                text, truncated = _cap(json.dumps(result, ensure_ascii=False))
                d |= {"result": text, "result_truncated": truncated}
                if result.get("is_error") is True or result.get("isError") is True:
                    ok = False
        elif itype == "file_change":
            changes = item.get("changes")
            d["changes"] = [
                {"path": c.get("path"), "kind": c.get("kind")}
                for c in changes if isinstance(c, dict)
            ] if isinstance(changes, list) else []
        elif itype == "web_search":
            d |= {"query": item.get("query"), "action": item.get("action")}
        elif itype == "collab_tool_call":
            d |= {"tool": item.get("tool"), "receivers": item.get("receiver_thread_ids")}
        # Known only once the item is completed (web searches carry no status at all).
        d["ok"] = ok if status not in ("in_progress",) else None
        if error is not None:
            d["error"] = error
        return d

    @staticmethod
    def _other_fields(itype: str, item: dict[str, Any]) -> dict[str, Any]:
        if itype in ("agent_message", "reasoning"):
            text, truncated = _cap(item.get("text"))
            return {"text": text, "truncated": truncated}
        if itype == "todo_list":
            items = item.get("items")
            return {"items": [{"text": i.get("text"), "completed": bool(i.get("completed"))}
                              for i in items if isinstance(i, dict)]
                    if isinstance(items, list) else []}
        # An error item: a warning Codex goes on after (config warnings, reroutes, lag).
        msg, _ = _cap(item.get("message"), 2000)
        return {"scope": "item", "message": msg, "fatal": False}
