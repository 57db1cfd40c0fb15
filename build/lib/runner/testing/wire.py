"""Model-provider wire formats, rendered from a scripted turn.

Each renderer returns either a JSON body (non-streaming) or a list of already framed
stream events (SSE frames or NDJSON lines), one element per write, so the server can
flush and pace them one by one. The shapes follow the real APIs closely enough for the
official SDKs, the Codex CLI (Responses, `codex-rs/codex-api/src/sse/responses.rs`)
and Claude Code (Messages) to consume them unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    call_id: str = field(default_factory=lambda: _id("call_"))
    custom_input: str | None = None  # a freeform (custom) tool call, e.g. Codex apply_patch
    # Responses only: the namespace of a tool offered inside a `namespace` tool (Codex
    # offers MCP tools as namespace `mcp__<server>`, and only accepts calls that name it).
    namespace: str | None = None

    @property
    def arguments_json(self) -> str:
        if self.custom_input is not None:
            return _dumps({"input": self.custom_input})
        return self.arguments if isinstance(self.arguments, str) else _dumps(self.arguments)

    @property
    def arguments_obj(self) -> Any:
        try:
            return json.loads(self.arguments_json)
        except ValueError:
            return {"raw": self.arguments_json}


@dataclass
class Turn:
    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)  # overrides of the estimate
    error: dict[str, Any] | None = None  # {"status": 500, "message": "..."}
    delay: float | None = None  # seconds between stream events (overrides the server's)
    # Responses only: raw output items sent before the turn's text and tool calls
    # (`reasoning`, `web_search_call`, ...), each as one output_item.added/done pair.
    items: list[dict[str, Any]] = field(default_factory=list)


def parse_turn(obj: Any) -> Turn:
    """A turn from its script form.

    "hello" | {"text": "hello"} | {"tool": "exec_command", "arguments": {...}}
    | {"tool": "apply_patch", "input": "*** Begin Patch..."} (freeform)
    | {"tool_calls": [{"name": ..., "arguments": ...}, ...], "text": "..."}
    | {"error": {"status": 500, "message": "..."}}
    | {"items": [{"type": "reasoning", ...}], "text": "..."} (raw Responses output items);
    a tool call may name its Responses "namespace"; any of them may add
    "usage": {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"}
    and "delay": seconds.
    """
    if isinstance(obj, Turn):
        return obj
    if isinstance(obj, str):
        return Turn(text=obj)
    if not isinstance(obj, dict):
        raise ValueError(f"a scripted turn is a string or an object, not {obj!r}")
    calls = []
    if "tool" in obj:
        calls.append(_call(obj))
    for c in obj.get("tool_calls") or []:
        calls.append(_call(c))
    err = obj.get("error")
    if isinstance(err, str):
        err = {"status": int(obj.get("status", 500)), "message": err}
    items = [dict(i) for i in obj.get("items") or []]
    if not calls and obj.get("text") is None and err is None and not items:
        raise ValueError(f"a scripted turn needs text, a tool call or an error: {obj!r}")
    return Turn(text=obj.get("text"), tool_calls=calls, usage=dict(obj.get("usage") or {}),
                error=err, delay=obj.get("delay"), items=items)


def _call(c: dict[str, Any]) -> ToolCall:
    name = c.get("tool") or c.get("name")
    if not name:
        raise ValueError(f"a tool call needs a name: {c!r}")
    kwargs: dict[str, Any] = {}
    if c.get("id"):
        kwargs["call_id"] = c["id"]
    if c.get("namespace"):
        kwargs["namespace"] = c["namespace"]
    return ToolCall(name=name, arguments=c.get("arguments", {}), custom_input=c.get("input"),
                    **kwargs)


@dataclass
class Usage:
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


def estimate_usage(turn: Turn, request_bytes: int) -> Usage:
    out_chars = len(turn.text or "") + sum(len(c.arguments_json) for c in turn.tool_calls)
    u = turn.usage
    return Usage(
        input_tokens=int(u.get("input_tokens", max(1, request_bytes // 4))),
        output_tokens=int(u.get("output_tokens", max(1, out_chars // 4))),
        cache_read_tokens=int(u.get("cache_read_tokens", 0)),
        cache_write_tokens=int(u.get("cache_write_tokens", 0)),
    )


def split_text(text: str, chunk_chars: int | None) -> list[str]:
    """Stream pieces: words by default, or fixed-size slices."""
    if not text:
        return []
    if chunk_chars:
        return [text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    pieces, cur = [], ""
    for ch in text:
        cur += ch
        if ch == " ":
            pieces.append(cur)
            cur = ""
    if cur:
        pieces.append(cur)
    return pieces


def _split_args(s: str) -> list[str]:
    return [s[i:i + 32] for i in range(0, len(s), 32)] or [""]


def sse(event: str | None, data: Any) -> bytes:
    body = data if isinstance(data, str) else _dumps(data)
    return (f"event: {event}\n" if event else "").encode() + f"data: {body}\n\n".encode()


# -- Anthropic Messages ----------------------------------------------------------------

def anthropic_message(turn: Turn, model: str, usage: Usage) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if turn.text:
        content.append({"type": "text", "text": turn.text})
    for c in turn.tool_calls:
        content.append({"type": "tool_use", "id": _toolu(c), "name": c.name,
                        "input": c.arguments_obj})
    return {"id": _id("msg_"), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": "tool_use" if turn.tool_calls else "end_turn",
            "stop_sequence": None, "usage": _anthropic_usage(usage)}


def _toolu(c: ToolCall) -> str:
    return c.call_id if c.call_id.startswith("toolu_") else "toolu_" + c.call_id.split("_", 1)[-1]


def _anthropic_usage(u: Usage, output: int | None = None) -> dict[str, Any]:
    return {"input_tokens": u.input_tokens, "output_tokens": u.output_tokens
            if output is None else output,
            "cache_creation_input_tokens": u.cache_write_tokens,
            "cache_read_input_tokens": u.cache_read_tokens}


def anthropic_stream(turn: Turn, model: str, usage: Usage, chunk_chars: int | None) -> list[bytes]:
    msg = anthropic_message(turn, model, usage)
    start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": _anthropic_usage(usage, output=1)}
    out = [sse("message_start", {"type": "message_start", "message": start}),
           sse("ping", {"type": "ping"})]
    for index, block in enumerate(msg["content"]):
        if block["type"] == "text":
            out.append(sse("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}}))
            for piece in split_text(block["text"], chunk_chars):
                out.append(sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": piece}}))
        else:
            out.append(sse("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"],
                                  "input": {}}}))
            for piece in _split_args(_dumps(block["input"])):
                out.append(sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}))
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(sse("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": usage.output_tokens}}))
    out.append(sse("message_stop", {"type": "message_stop"}))
    return out


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
    return {"type": "error", "error": {"type": kinds.get(status, "api_error"), "message": message}}


# -- OpenAI Responses ------------------------------------------------------------------

def _responses_usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.input_tokens,
            "input_tokens_details": {"cached_tokens": u.cache_read_tokens},
            "output_tokens": u.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.input_tokens + u.output_tokens}


def _response_obj(rid: str, model: str, status: str, output: list[Any],
                  usage: dict[str, Any] | None, created: int) -> dict[str, Any]:
    return {"id": rid, "object": "response", "created_at": created, "status": status,
            "error": None, "incomplete_details": None, "instructions": None,
            "max_output_tokens": None, "model": model, "output": output,
            "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None,
            "metadata": {}}


def _responses_items(turn: Turn) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"id": _id("item_"), **i} for i in turn.items]
    if turn.text is not None:
        items.append({"id": _id("msg_"), "type": "message", "role": "assistant",
                      "status": "completed",
                      "content": [{"type": "output_text", "text": turn.text,
                                   "annotations": [], "logprobs": []}]})
    for c in turn.tool_calls:
        if c.custom_input is not None:
            items.append({"id": _id("ctc_"), "type": "custom_tool_call", "status": "completed",
                          "call_id": c.call_id, "name": c.name, "input": c.custom_input})
        else:
            call = {"id": _id("fc_"), "type": "function_call", "status": "completed",
                    "call_id": c.call_id, "name": c.name, "arguments": c.arguments_json}
            if c.namespace:
                call["namespace"] = c.namespace
            items.append(call)
    return items


def responses_body(turn: Turn, model: str, usage: Usage) -> dict[str, Any]:
    return _response_obj(_id("resp_"), model, "completed", _responses_items(turn),
                         _responses_usage(usage), int(time.time()))


def responses_stream(turn: Turn, model: str, usage: Usage, chunk_chars: int | None) -> list[bytes]:
    rid, created = _id("resp_"), int(time.time())
    items = _responses_items(turn)
    seq = 0
    out: list[bytes] = []

    def emit(etype: str, **data: Any) -> None:
        nonlocal seq
        out.append(sse(etype, {"type": etype, "sequence_number": seq, **data}))
        seq += 1

    emit("response.created", response=_response_obj(rid, model, "in_progress", [], None, created))
    emit("response.in_progress",
         response=_response_obj(rid, model, "in_progress", [], None, created))
    for oi, item in enumerate(items):
        iid = item["id"]
        if item["type"] == "message":
            text = item["content"][0]["text"]
            emit("response.output_item.added", output_index=oi,
                 item={**item, "status": "in_progress", "content": []})
            emit("response.content_part.added", item_id=iid, output_index=oi, content_index=0,
                 part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            for piece in split_text(text, chunk_chars):
                emit("response.output_text.delta", item_id=iid, output_index=oi,
                     content_index=0, delta=piece, logprobs=[])
            emit("response.output_text.done", item_id=iid, output_index=oi, content_index=0,
                 text=text, logprobs=[])
            emit("response.content_part.done", item_id=iid, output_index=oi, content_index=0,
                 part=item["content"][0])
        elif item["type"] == "function_call":
            emit("response.output_item.added", output_index=oi,
                 item={**item, "status": "in_progress", "arguments": ""})
            for piece in _split_args(item["arguments"]):
                emit("response.function_call_arguments.delta", item_id=iid, output_index=oi,
                     delta=piece)
            emit("response.function_call_arguments.done", item_id=iid, output_index=oi,
                 name=item["name"], arguments=item["arguments"])
        elif item["type"] == "custom_tool_call":
            emit("response.output_item.added", output_index=oi,
                 item={**item, "status": "in_progress", "input": ""})
            emit("response.custom_tool_call_input.delta", item_id=iid, output_index=oi,
                 delta=item["input"])
            emit("response.custom_tool_call_input.done", item_id=iid, output_index=oi,
                 input=item["input"])
        else:  # a raw item from the script (reasoning, web_search_call, ...)
            emit("response.output_item.added", output_index=oi, item=item)
        emit("response.output_item.done", output_index=oi, item=item)
    emit("response.completed", response=_response_obj(rid, model, "completed", items,
                                                      _responses_usage(usage), created))
    return out


def openai_error(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found",
             429: "rate_limit_exceeded"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "param": None, "code": kinds.get(status, "server_error")}}


# -- OpenAI Chat Completions -----------------------------------------------------------

def _chat_usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens}}


def chat_body(turn: Turn, model: str, usage: Usage) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": turn.text, "refusal": None}
    if turn.tool_calls:
        msg["tool_calls"] = [{"id": c.call_id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments_json}}
                             for c in turn.tool_calls]
    return {"id": _id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": msg, "logprobs": None,
                         "finish_reason": "tool_calls" if turn.tool_calls else "stop"}],
            "usage": _chat_usage(usage)}


def chat_stream(turn: Turn, model: str, usage: Usage, chunk_chars: int | None,
                include_usage: bool) -> list[bytes]:
    cid, created = _id("chatcmpl-"), int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": model, "system_fingerprint": None,
                               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return sse(None, obj)

    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    for piece in split_text(turn.text or "", chunk_chars):
        out.append(chunk({"content": piece}))
    for i, c in enumerate(turn.tool_calls):
        out.append(chunk({"tool_calls": [{"index": i, "id": c.call_id, "type": "function",
                                          "function": {"name": c.name, "arguments": ""}}]}))
        for piece in _split_args(c.arguments_json):
            out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    out.append(chunk({}, "tool_calls" if turn.tool_calls else "stop"))
    if include_usage:
        out.append(sse(None, {"id": cid, "object": "chat.completion.chunk", "created": created,
                              "model": model, "system_fingerprint": None, "choices": [],
                              "usage": _chat_usage(usage)}))
    out.append(sse(None, "[DONE]"))
    return out


# -- Ollama ----------------------------------------------------------------------------

def _ollama_time() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


def _ollama_done(model: str, usage: Usage, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "created_at": _ollama_time(), **extra, "done": True,
            "done_reason": "stop", "total_duration": 1000000, "load_duration": 100000,
            "prompt_eval_count": usage.input_tokens, "prompt_eval_duration": 100000,
            "eval_count": usage.output_tokens, "eval_duration": 800000}


def _ollama_msg(content: str, calls: list[ToolCall] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments_obj}}
                             for c in calls]
    return msg


def ollama_chat(turn: Turn, model: str, usage: Usage, stream: bool,
                chunk_chars: int | None) -> dict[str, Any] | list[bytes]:
    if not stream:
        return _ollama_done(model, usage, {"message": _ollama_msg(turn.text or "",
                                                                  turn.tool_calls)})
    lines = [(_dumps({"model": model, "created_at": _ollama_time(),
                      "message": _ollama_msg(p), "done": False}) + "\n").encode()
             for p in split_text(turn.text or "", chunk_chars)]
    if turn.tool_calls:
        lines.append((_dumps({"model": model, "created_at": _ollama_time(),
                              "message": _ollama_msg("", turn.tool_calls),
                              "done": False}) + "\n").encode())
    lines.append((_dumps(_ollama_done(model, usage, {"message": _ollama_msg("")})) + "\n")
                 .encode())
    return lines


def ollama_generate(turn: Turn, model: str, usage: Usage, stream: bool,
                    chunk_chars: int | None) -> dict[str, Any] | list[bytes]:
    text = turn.text if turn.text is not None else _dumps(
        [{"name": c.name, "arguments": c.arguments_obj} for c in turn.tool_calls])
    if not stream:
        return _ollama_done(model, usage, {"response": text})
    lines = [(_dumps({"model": model, "created_at": _ollama_time(), "response": p,
                      "done": False}) + "\n").encode() for p in split_text(text, chunk_chars)]
    lines.append((_dumps(_ollama_done(model, usage, {"response": ""})) + "\n").encode())
    return lines


def ollama_tags(models: list[str]) -> dict[str, Any]:
    return {"models": [{"name": m if ":" in m else f"{m}:latest",
                        "model": m if ":" in m else f"{m}:latest",
                        "modified_at": "2026-01-01T00:00:00Z", "size": 1, "digest": "0" * 64,
                        "details": {"format": "gguf", "family": "scripted",
                                    "parameter_size": "1B", "quantization_level": "Q4_0"}}
                       for m in models]}


def models_list(models: list[str]) -> dict[str, Any]:
    """One listing both SDKs accept: OpenAI's `object/owned_by`, Anthropic's `type`,
    `display_name`, `created_at` and paging fields."""
    data = [{"id": m, "object": "model", "type": "model", "display_name": m,
             "created": 1_700_000_000, "created_at": "2026-01-01T00:00:00Z",
             "owned_by": "scripted"} for m in models]
    return {"object": "list", "data": data, "has_more": False,
            "first_id": models[0] if models else None, "last_id": models[-1] if models else None}
