"""Airlock's builtin agent: a tool-use loop that runs INSIDE the sandbox (image `builtin`).

    python3 -I /opt/airlock/airlock_sandbox/agent_loop.py --api anthropic --model M \
        [--max-steps N] [--writable DIR ...] [--stream | --no-stream] -- PROMPT

It speaks one provider API through the official SDKs, against the gateway the
environment names (`ANTHROPIC_BASE_URL`, `OPENAI_BASE_URL`, `OLLAMA_HOST`):
- `anthropic`: Messages (`anthropic` SDK), streamed;
- `responses`: OpenAI Responses (`openai` SDK), streamed;
- `chat`: Chat Completions (`openai` SDK), for OpenAI-compatible servers; not streamed
  by default, as some of them refuse `stream_options` (the only way to get usage);
- `ollama`: Ollama's native `/api/chat` (NDJSON), streamed, over httpx.

Tools: `shell` (bash inside the sandbox, with a timeout and capped output), `read_file`,
`write_file` (only under the writable paths it is given; the kernel refuses the rest
anyway), and the run's MCP tools, listed from `AIRLOCK_MCP_URL` with the `mcp` SDK
(streamable HTTP, bearer `AIRLOCK_MCP_TOKEN`) and called through it.

Its stdout carries one JSON object per line and nothing else, each with
`"airlock_agent": 1` and a `type`:
  start       {api, model, tools, max_steps, writable}
  turn        {turn, model, stop_reason, tool_calls, usage{input_tokens, output_tokens,
               cache_read_tokens, cache_write_tokens}}      one per model response
  message     {text, final}                 assistant text (final: the answer, a step)
  tool_start  {id, name, arguments}         before a tool runs
  tool_call   {id, name, arguments, ok, error, duration_ms, ... outcome}  a step
  error       {where, error, status?}
  end         {status: completed|max_steps|error, steps, turns, usage}
Anything else it or a library prints goes to stderr. Exit codes: 0 a final answer;
1 an error (provider, MCP, internal); 2 bad arguments; 3 the max-steps safety net (the
host enforces the real budget and normally stops the run first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

PYLIB = "/opt/airlock/pylib"  # the SDKs, installed read-only in the builtin image
EVENT_VERSION = 1
MODEL_OUTPUT_CAP = 32_000  # characters of a tool result the model sees
EVENT_TEXT_CAP = 2_000  # characters of a text field carried by one event
SHELL_TIMEOUT = 120
SHELL_TIMEOUT_MAX = 600
READ_CAP = 256 * 1024
DEFAULT_MODELS = {"anthropic": "claude-sonnet-4-5", "responses": "gpt-5", "chat": "gpt-5",
                  "ollama": "llama3"}
STREAM_DEFAULT = {"anthropic": True, "responses": True, "chat": False, "ollama": True}
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MAX_STEPS = 0, 1, 2, 3


# -- the event channel ---------------------------------------------------------------------


class Events:
    """JSON lines on the original stdout; fd 1 itself is pointed at stderr, so a stray
    print from a library can never corrupt the channel."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def emit(self, type_: str, **data: Any) -> None:
        line = json.dumps({"airlock_agent": EVENT_VERSION, "type": type_, **data},
                          ensure_ascii=False, default=str, separators=(",", ":"))
        self._out.write(line + "\n")
        self._out.flush()


def cap(text: str, limit: int) -> str:
    """Head and tail of a long text, with how much was cut."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - 2 * half} characters cut] ...\n{text[-half:]}"


def cap_args(args: Any) -> Any:
    if isinstance(args, dict):
        return {k: cap(v, EVENT_TEXT_CAP) if isinstance(v, str) else v for k, v in args.items()}
    return args


# -- tools -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    text: str  # what the model sees
    info: dict[str, Any] = field(default_factory=dict)  # what the event carries


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any]], Awaitable[Outcome]]


def _errno_text(exc: OSError) -> str:
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{name}: {exc.strerror or exc}" if name else str(exc)


class LocalTools:
    def __init__(self, writable: list[str]) -> None:
        self.writable = [os.path.realpath(p) for p in writable]

    def tools(self) -> list[Tool]:
        return [
            Tool("shell", "Run a bash command inside the sandbox (working directory: "
                 f"{os.getcwd()}). Returns the exit code and the combined stdout/stderr. "
                 "There is no network.",
                 {"type": "object",
                  "properties": {"command": {"type": "string", "description": "bash command"},
                                 "timeout": {"type": "integer",
                                             "description": f"seconds (default {SHELL_TIMEOUT}, "
                                                            f"at most {SHELL_TIMEOUT_MAX})"}},
                  "required": ["command"]},
                 self.shell),
            Tool("read_file", "Read a text file.",
                 {"type": "object",
                  "properties": {"path": {"type": "string"},
                                 "offset": {"type": "integer", "description": "byte offset"},
                                 "max_bytes": {"type": "integer"}},
                  "required": ["path"]},
                 self.read_file),
            Tool("write_file", "Write (or append to) a text file, creating its directory. "
                 f"Only these paths are writable: {', '.join(self.writable) or 'none'}.",
                 {"type": "object",
                  "properties": {"path": {"type": "string"}, "content": {"type": "string"},
                                 "append": {"type": "boolean"}},
                  "required": ["path", "content"]},
                 self.write_file),
        ]

    async def shell(self, args: dict[str, Any]) -> Outcome:
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            return Outcome(False, "error: `command` must be a non-empty string",
                           {"error": "no command"})
        try:
            timeout = float(args.get("timeout") or SHELL_TIMEOUT)
        except (TypeError, ValueError):
            timeout = SHELL_TIMEOUT
        timeout = max(1.0, min(timeout, SHELL_TIMEOUT_MAX))
        shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        try:
            proc = await asyncio.create_subprocess_exec(
                shell, "-c", command, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
        except OSError as exc:
            return Outcome(False, f"error: cannot start {shell}: {_errno_text(exc)}",
                           {"error": _errno_text(exc)})
        head, tail, total = bytearray(), bytearray(), 0
        half = MODEL_OUTPUT_CAP // 2

        async def collect() -> None:
            nonlocal tail, total
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                total += len(chunk)
                room = half - len(head)
                if room > 0:
                    head.extend(chunk[:room])
                    chunk = chunk[room:]
                if chunk:
                    tail = (tail + chunk)[-half:]
            await proc.wait()

        timed_out = False
        try:
            await asyncio.wait_for(collect(), timeout)
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
        output = head.decode("utf-8", "replace")
        if total > len(head):
            cut = total - len(head) - len(tail)
            if cut > 0:
                output += f"\n... [{cut} bytes cut] ...\n"
            output += tail.decode("utf-8", "replace")
        code = proc.returncode
        info: dict[str, Any] = {"exit_code": code, "output": cap(output, EVENT_TEXT_CAP),
                                "output_bytes": total}
        if timed_out:
            info["error"] = f"timed out after {timeout:g}s"
            return Outcome(False, f"timed out after {timeout:g}s (killed)\n{output}", info)
        if code is not None and code < 0:
            info["error"] = f"killed by signal {-code}"
        elif code:
            info["error"] = f"exit code {code}"
        return Outcome(code == 0, f"exit code: {code}\n{output}", info)

    async def read_file(self, args: dict[str, Any]) -> Outcome:
        path = args.get("path")
        if not isinstance(path, str) or not path:
            return Outcome(False, "error: `path` must be a non-empty string", {"error": "no path"})
        try:
            offset = max(0, int(args.get("offset") or 0))
            limit = max(1, min(int(args.get("max_bytes") or READ_CAP), READ_CAP))
        except (TypeError, ValueError):
            return Outcome(False, "error: offset and max_bytes must be integers",
                           {"error": "bad arguments"})
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(limit + 1)
        except OSError as exc:
            return Outcome(False, f"error: cannot read {path}: {_errno_text(exc)}",
                           {"path": path, "error": _errno_text(exc)})
        more = len(data) > limit
        text = data[:limit].decode("utf-8", "replace")
        note = f"\n... [more after byte {offset + limit}]" if more else ""
        return Outcome(True, cap(text, MODEL_OUTPUT_CAP) + note,
                       {"path": path, "bytes": min(len(data), limit), "truncated": more})

    def _writable(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real == root or real.startswith(root.rstrip("/") + "/")
                   for root in self.writable)

    async def write_file(self, args: dict[str, Any]) -> Outcome:
        path, content = args.get("path"), args.get("content")
        if not isinstance(path, str) or not path or not isinstance(content, str):
            return Outcome(False, "error: `path` and `content` must be strings",
                           {"error": "bad arguments"})
        if not self._writable(path):
            roots = ", ".join(self.writable) or "none"
            msg = f"refused: {path} is outside the writable paths ({roots})"
            return Outcome(False, f"error: {msg}", {"path": path, "error": msg})
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "a" if args.get("append") else "w", encoding="utf-8") as fh:
                fh.write(content)
        except OSError as exc:
            return Outcome(False, f"error: cannot write {path}: {_errno_text(exc)}",
                           {"path": path, "error": _errno_text(exc)})
        size = len(content.encode())
        return Outcome(True, f"wrote {size} bytes to {path}", {"path": path, "bytes": size})


class McpTools:
    """The run's MCP server: its tools listed once, each call made through the SDK."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def __aenter__(self) -> McpTools:
        import mcp

        headers = {"Authorization": f"Bearer {self.token}"}
        if hasattr(mcp, "Client"):  # mcp >= 2: a Client over a transport
            import httpx2  # type: ignore[import-not-found,unused-ignore]
            from mcp.client.streamable_http import streamable_http_client

            http = await self._stack.enter_async_context(
                httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300),
                                   trust_env=False))
            self._client = await self._stack.enter_async_context(
                mcp.Client(streamable_http_client(self.url, http_client=http), mode="legacy"))
        else:  # mcp 1.x: ClientSession over streamablehttp_client
            from mcp.client import streamable_http as sh

            read, write, *_ = await self._stack.enter_async_context(
                sh.streamablehttp_client(self.url, headers=headers))  # type: ignore[attr-defined,unused-ignore]
            session = await self._stack.enter_async_context(mcp.ClientSession(read, write))
            await session.initialize()
            self._client = session
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def tools(self, taken: set[str]) -> list[Tool]:
        out = []
        cursor = None
        listed: list[Any] = []
        while True:
            result = await (self._client.list_tools(cursor=cursor) if cursor
                            else self._client.list_tools())
            listed.extend(result.tools)
            cursor = getattr(result, "nextCursor", None) or getattr(result, "next_cursor", None)
            if not cursor:
                break
        for t in listed:
            exposed = t.name if t.name not in taken else f"mcp__{t.name}"
            schema: Any = getattr(t, "inputSchema", None) or getattr(t, "input_schema", None)
            if schema is not None and hasattr(schema, "model_dump"):
                schema = schema.model_dump(exclude_none=True, by_alias=True)
            out.append(Tool(exposed, (t.description or f"MCP tool {t.name}")[:1024],
                            dict(schema or {"type": "object", "properties": {}}),
                            self._caller(t.name)))
        return out

    def _caller(self, name: str) -> Callable[[dict[str, Any]], Awaitable[Outcome]]:
        async def call(args: dict[str, Any]) -> Outcome:
            try:
                result = await self._client.call_tool(name, args)
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                return Outcome(False, f"error: {msg}", {"mcp_tool": name, "error": msg})
            parts = []
            for block in result.content or []:
                text = getattr(block, "text", None)
                if text is not None:
                    parts.append(text)
                else:
                    dump = block.model_dump() if hasattr(block, "model_dump") else str(block)
                    parts.append(json.dumps(dump, default=str)[:4000])
            structured = getattr(result, "structuredContent", None) or getattr(
                result, "structured_content", None)
            if not parts and structured is not None:
                parts.append(json.dumps(structured, default=str))
            text = "\n".join(parts)
            is_error = bool(getattr(result, "isError", False) or getattr(result, "is_error", False))
            info: dict[str, Any] = {"mcp_tool": name, "output": cap(text, EVENT_TEXT_CAP)}
            if is_error:
                info["error"] = cap(text, 500) or "the tool reported an error"
            return Outcome(not is_error, cap(text, MODEL_OUTPUT_CAP), info)

        return call


# -- models ----------------------------------------------------------------------------------


@dataclass
class Call:
    id: str
    name: str
    raw: str  # the arguments as the model sent them
    args: dict[str, Any] | None  # parsed, or None when they are not a JSON object


@dataclass
class Turn:
    text: str
    calls: list[Call]
    usage: dict[str, int]
    stop_reason: str | None
    model: str | None


def parse_args(raw: Any) -> dict[str, Any] | None:
    if isinstance(raw, dict):
        return raw
    if raw in (None, ""):
        return {}
    try:
        obj = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def usage_dict(inp: Any, out: Any, cache_read: Any = 0, cache_write: Any = 0) -> dict[str, int]:
    return {"input_tokens": int(inp or 0), "output_tokens": int(out or 0),
            "cache_read_tokens": int(cache_read or 0), "cache_write_tokens": int(cache_write or 0)}


class ProviderError(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Model:
    api = ""

    def __init__(self, model: str, system: str, prompt: str, tools: list[Tool], *,
                 stream: bool, max_tokens: int) -> None:
        self.model, self.system, self.tools = model, system, tools
        self.stream, self.max_tokens = stream, max_tokens
        self.start(prompt)

    def start(self, prompt: str) -> None:
        raise NotImplementedError

    async def turn(self) -> Turn:
        """One request with the conversation so far; its answer is added to it."""
        raise NotImplementedError

    def add_results(self, results: list[tuple[Call, str, bool]]) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def _sdk_error(exc: Exception) -> ProviderError:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str):
            message = err
    return ProviderError(f"{type(exc).__name__}: {message}", status)


class AnthropicModel(Model):
    api = "anthropic"

    def start(self, prompt: str) -> None:
        import anthropic

        self._sdk = anthropic
        self.client = anthropic.AsyncAnthropic(
            base_url=os.environ.get("ANTHROPIC_BASE_URL"),
            api_key=os.environ.get("ANTHROPIC_API_KEY") or "airlock-placeholder-key",
            max_retries=2)
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]

    async def turn(self) -> Turn:
        kwargs: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                  "system": self.system, "messages": self.messages}
        if self.tools:
            kwargs["tools"] = [{"name": t.name, "description": t.description,
                                "input_schema": t.parameters} for t in self.tools]
        try:
            if self.stream:
                async with self.client.messages.stream(**kwargs) as s:
                    msg = await s.get_final_message()
            else:
                msg = await self.client.messages.create(**kwargs)
        except self._sdk.APIError as exc:
            raise _sdk_error(exc) from None
        content: list[dict[str, Any]] = []
        texts, calls = [], []
        for block in msg.content:
            if block.type == "text":
                texts.append(block.text)
                content.append({"type": "text", "text": block.text})
            elif block.type == "tool_use":
                args = block.input if isinstance(block.input, dict) else None
                calls.append(Call(block.id, block.name, json.dumps(block.input), args))
                content.append({"type": "tool_use", "id": block.id, "name": block.name,
                                "input": block.input})
            elif block.type in ("thinking", "redacted_thinking"):
                content.append(block.model_dump(exclude_none=True))
        self.messages.append({"role": "assistant", "content": content or [
            {"type": "text", "text": "(no answer)"}]})
        u = msg.usage
        return Turn("".join(texts), calls,
                    usage_dict(u.input_tokens, u.output_tokens,
                               getattr(u, "cache_read_input_tokens", 0),
                               getattr(u, "cache_creation_input_tokens", 0)),
                    msg.stop_reason, msg.model)

    def add_results(self, results: list[tuple[Call, str, bool]]) -> None:
        self.messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": c.id, "content": text, "is_error": err}
            for c, text, err in results]})

    async def aclose(self) -> None:
        await self.client.close()


class _OpenAIBase(Model):
    client: Any

    def _client(self) -> Any:
        import openai

        self._sdk = openai
        return openai.AsyncOpenAI(
            base_url=os.environ.get("OPENAI_BASE_URL"),
            api_key=os.environ.get("OPENAI_API_KEY") or "airlock-placeholder-key",
            max_retries=2)

    async def aclose(self) -> None:
        await self.client.close()


class ResponsesModel(_OpenAIBase):
    api = "responses"

    def start(self, prompt: str) -> None:
        self.client = self._client()
        self.items: list[dict[str, Any]] = [{"role": "user", "content": prompt}]

    async def turn(self) -> Turn:
        kwargs: dict[str, Any] = {"model": self.model, "instructions": self.system,
                                  "input": self.items, "store": False}
        if self.tools:
            kwargs["tools"] = [{"type": "function", "name": t.name,
                                "description": t.description, "parameters": t.parameters,
                                "strict": False} for t in self.tools]
        try:
            if self.stream:
                resp = None
                stream = await self.client.responses.create(stream=True, **kwargs)
                async for event in stream:
                    etype = getattr(event, "type", "")
                    if etype in ("response.completed", "response.incomplete"):
                        resp = event.response
                    elif etype == "response.failed":
                        err = getattr(event.response, "error", None)
                        raise ProviderError(f"response failed: {getattr(err, 'message', err)}")
                    elif etype == "error":
                        raise ProviderError(f"stream error: {getattr(event, 'message', event)}")
                if resp is None:
                    raise ProviderError("the response stream ended without response.completed")
            else:
                resp = await self.client.responses.create(**kwargs)
        except self._sdk.APIError as exc:
            raise _sdk_error(exc) from None
        texts, calls = [], []
        for item in resp.output or []:
            if item.type == "message":
                text = "".join(getattr(p, "text", "") or "" for p in item.content
                               if getattr(p, "type", "") == "output_text")
                texts.append(text)
                self.items.append({"role": "assistant", "content": text})
            elif item.type == "function_call":
                calls.append(Call(item.call_id, item.name, item.arguments,
                                  parse_args(item.arguments)))
                self.items.append({"type": "function_call", "call_id": item.call_id,
                                   "name": item.name, "arguments": item.arguments})
        u = resp.usage
        details = getattr(u, "input_tokens_details", None) if u else None
        usage = usage_dict(getattr(u, "input_tokens", 0), getattr(u, "output_tokens", 0),
                           getattr(details, "cached_tokens", 0))
        stop = "tool_calls" if calls else (resp.status or "completed")
        return Turn("".join(texts), calls, usage, stop, resp.model)

    def add_results(self, results: list[tuple[Call, str, bool]]) -> None:
        for c, text, _err in results:
            self.items.append({"type": "function_call_output", "call_id": c.id, "output": text})


def _chat_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in tools]


class ChatModel(_OpenAIBase):
    api = "chat"

    def start(self, prompt: str) -> None:
        self.client = self._client()
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system},
                                               {"role": "user", "content": prompt}]

    async def turn(self) -> Turn:
        kwargs: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.tools:
            kwargs["tools"] = _chat_tools(self.tools)
        text, finish, model, usage = "", None, None, None
        pending: dict[int, dict[str, str]] = {}
        try:
            if self.stream:
                stream = await self.client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs)
                parts = []
                async for chunk in stream:
                    model = chunk.model or model
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices or []:
                        delta = choice.delta
                        if delta.content:
                            parts.append(delta.content)
                        for tc in delta.tool_calls or []:
                            slot = pending.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                            if tc.id:
                                slot["id"] = tc.id
                            if tc.function is not None:
                                slot["name"] += tc.function.name or ""
                                slot["args"] += tc.function.arguments or ""
                        finish = choice.finish_reason or finish
                text = "".join(parts)
            else:
                resp = await self.client.chat.completions.create(**kwargs)
                model, usage = resp.model, resp.usage
                choice = resp.choices[0]
                finish = choice.finish_reason
                text = choice.message.content or ""
                for i, tc in enumerate(choice.message.tool_calls or []):
                    fn = getattr(tc, "function", None)
                    pending[i] = {"id": tc.id, "name": getattr(fn, "name", ""),
                                  "args": getattr(fn, "arguments", "") or ""}
        except self._sdk.APIError as exc:
            raise _sdk_error(exc) from None
        calls = [Call(s["id"] or f"call_{uuid.uuid4().hex[:12]}", s["name"], s["args"],
                      parse_args(s["args"])) for _, s in sorted(pending.items())]
        msg: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.raw or "{}"}}
                                 for c in calls]
        self.messages.append(msg)
        details = getattr(usage, "prompt_tokens_details", None)
        return Turn(text, calls,
                    usage_dict(getattr(usage, "prompt_tokens", 0),
                               getattr(usage, "completion_tokens", 0),
                               getattr(details, "cached_tokens", 0)),
                    finish, model)

    def add_results(self, results: list[tuple[Call, str, bool]]) -> None:
        for c, text, _err in results:
            self.messages.append({"role": "tool", "tool_call_id": c.id, "content": text})


class OllamaModel(Model):
    api = "ollama"

    def start(self, prompt: str) -> None:
        import httpx

        self._httpx = httpx
        base = os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"
        if "://" not in base:
            base = "http://" + base
        self.client = httpx.AsyncClient(base_url=base.rstrip("/"), trust_env=False,
                                        timeout=httpx.Timeout(30, read=600))
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system},
                                               {"role": "user", "content": prompt}]

    async def turn(self) -> Turn:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages,
                                "stream": self.stream}
        if self.tools:
            body["tools"] = _chat_tools(self.tools)
        parts: list[str] = []
        raw_calls: list[dict[str, Any]] = []
        done: dict[str, Any] = {}

        def take(obj: dict[str, Any]) -> None:
            if obj.get("error"):
                raise ProviderError(f"ollama: {obj['error']}")
            msg = obj.get("message") or {}
            if msg.get("content"):
                parts.append(msg["content"])
            raw_calls.extend(msg.get("tool_calls") or [])
            if obj.get("done"):
                done.update(obj)

        try:
            if self.stream:
                async with self.client.stream("POST", "/api/chat", json=body) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise ProviderError(_ollama_error(r.text), r.status_code)
                    async for line in r.aiter_lines():
                        if line.strip():
                            take(json.loads(line))
            else:
                r = await self.client.post("/api/chat", json=body)
                if r.status_code >= 400:
                    raise ProviderError(_ollama_error(r.text), r.status_code)
                take(r.json())
        except self._httpx.HTTPError as exc:
            raise ProviderError(f"{type(exc).__name__}: {exc}") from None
        calls = []
        for i, rc in enumerate(raw_calls):
            fn = rc.get("function") or {}
            args = fn.get("arguments")
            calls.append(Call(rc.get("id") or f"call_{len(self.messages)}_{i}",
                              str(fn.get("name") or ""),
                              args if isinstance(args, str) else json.dumps(args or {}),
                              parse_args(args)))
        text = "".join(parts)
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if raw_calls:
            msg["tool_calls"] = raw_calls
        self.messages.append(msg)
        usage = usage_dict(done.get("prompt_eval_count"), done.get("eval_count"))
        return Turn(text, calls, usage, done.get("done_reason"), done.get("model"))

    def add_results(self, results: list[tuple[Call, str, bool]]) -> None:
        for c, text, _err in results:
            self.messages.append({"role": "tool", "content": text, "tool_name": c.name})

    async def aclose(self) -> None:
        await self.client.aclose()


def _ollama_error(text: str) -> str:
    try:
        obj = json.loads(text)
        err = obj.get("error")
        if isinstance(err, dict):
            err = err.get("message")
        return f"ollama: {err or text[:500]}"
    except ValueError:
        return f"ollama: {text[:500]}"


MODELS: dict[str, type[Model]] = {"anthropic": AnthropicModel, "responses": ResponsesModel,
                                  "chat": ChatModel, "ollama": OllamaModel}

SYSTEM = """You are Airlock's builtin agent. You work inside an isolated sandbox: there \
is no network apart from the model provider, the root filesystem is read-only, and you \
run as an unprivileged user. Working directory: {cwd}. Writable paths: {writable}.
Tools: `shell` runs bash commands, `read_file` and `write_file` handle files{mcp}.
Work step by step with the tools. When the task is done, reply with a short final answer \
and no tool call."""


# -- the loop --------------------------------------------------------------------------------


@dataclass
class Options:
    api: str
    model: str
    prompt: str
    max_steps: int
    writable: list[str]
    stream: bool
    max_tokens: int
    system: str | None


class Loop:
    def __init__(self, opts: Options, events: Events) -> None:
        self.o = opts
        self.ev = events
        self.steps = 0
        self.turns = 0
        self.totals = usage_dict(0, 0)

    def step(self) -> int:
        self.steps += 1
        return self.steps

    async def run(self) -> int:
        async with contextlib.AsyncExitStack() as stack:
            tools = LocalTools(self.o.writable).tools()
            mcp_url = os.environ.get("AIRLOCK_MCP_URL")
            if mcp_url:
                try:
                    mcp_tools = await stack.enter_async_context(
                        McpTools(mcp_url, os.environ.get("AIRLOCK_MCP_TOKEN", "")))
                    tools += await mcp_tools.tools({t.name for t in tools})
                except Exception as exc:
                    return self.fail("mcp", f"cannot list the run's MCP tools at {mcp_url}: "
                                            f"{_describe(exc)}")
            by_name = {t.name: t for t in tools}
            mcp_names = [t.name for t in tools[3:]]
            system = self.o.system or SYSTEM.format(
                cwd=os.getcwd(), writable=", ".join(self.o.writable) or "none",
                mcp=f", and the run's MCP tools: {', '.join(mcp_names)}" if mcp_names else "")
            self.ev.emit("start", api=self.o.api, model=self.o.model,
                         tools=[t.name for t in tools], max_steps=self.o.max_steps,
                         writable=self.o.writable)
            model = MODELS[self.o.api](self.o.model, system, self.o.prompt, tools,
                                       stream=self.o.stream, max_tokens=self.o.max_tokens)
            stack.push_async_callback(model.aclose)
            return await self._loop(model, by_name)
        return EXIT_ERROR  # pragma: no cover - an exit stack does not swallow returns

    async def _loop(self, model: Model, by_name: dict[str, Tool]) -> int:
        while True:
            try:
                turn = await model.turn()
            except ProviderError as exc:
                return self.fail("provider", str(exc), status=exc.status)
            self.turns += 1
            for k, v in turn.usage.items():
                self.totals[k] += v
            self.ev.emit("turn", turn=self.turns, model=turn.model, stop_reason=turn.stop_reason,
                         tool_calls=len(turn.calls), usage=turn.usage)
            if not turn.calls:
                self.ev.emit("message", text=turn.text, final=True, step=self.step())
                self.end("completed")
                return EXIT_OK
            if turn.text.strip():
                self.ev.emit("message", text=cap(turn.text, EVENT_TEXT_CAP), final=False)
            results: list[tuple[Call, str, bool]] = []
            for call in turn.calls:
                if self.steps >= self.o.max_steps:
                    break
                text, ok = await self._call(call, by_name)
                results.append((call, cap(text, MODEL_OUTPUT_CAP), not ok))
            if self.steps >= self.o.max_steps:
                self.ev.emit("error", where="agent",
                             error=f"stopped after {self.steps} steps (--max-steps)")
                self.end("max_steps")
                return EXIT_MAX_STEPS
            model.add_results(results)

    async def _call(self, call: Call, by_name: dict[str, Tool]) -> tuple[str, bool]:
        shown = cap_args(call.args) if call.args is not None else cap(call.raw, EVENT_TEXT_CAP)
        self.ev.emit("tool_start", id=call.id, name=call.name, arguments=shown)
        t0 = time.monotonic()
        tool = by_name.get(call.name)
        if tool is None:
            out = Outcome(False, f"error: there is no tool named {call.name!r}",
                          {"error": "unknown tool"})
        elif call.args is None:
            out = Outcome(False, "error: the arguments are not a JSON object",
                          {"error": "arguments are not a JSON object"})
        else:
            try:
                out = await tool.run(call.args)
            except Exception as exc:
                out = Outcome(False, f"error: {_describe(exc)}", {"error": _describe(exc)})
        info = {"error": None, **out.info}
        self.ev.emit("tool_call", id=call.id, name=call.name, arguments=shown, ok=out.ok,
                     duration_ms=round((time.monotonic() - t0) * 1000, 1), step=self.step(),
                     **info)
        return out.text, out.ok

    def fail(self, where: str, error: str, **extra: Any) -> int:
        self.ev.emit("error", where=where, error=cap(error, EVENT_TEXT_CAP), **extra)
        self.end("error")
        return EXIT_ERROR

    def end(self, status: str) -> None:
        self.ev.emit("end", status=status, steps=self.steps, turns=self.turns, usage=self.totals)


def _describe(exc: BaseException) -> str:
    # anyio/asyncio task groups wrap the cause: show the innermost one.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def parse(argv: list[str]) -> Options:
    ap = argparse.ArgumentParser(prog="agent_loop", description="Airlock's builtin agent")
    ap.add_argument("--api", choices=sorted(MODELS), default="anthropic")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--writable", action="append", default=[])
    ap.add_argument("--stream", dest="stream", action="store_true", default=None)
    ap.add_argument("--no-stream", dest="stream", action="store_false")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--system", default=None, help="replace the default system prompt")
    ap.add_argument("prompt", nargs="+")
    ns = ap.parse_args(argv)
    if ns.max_steps < 1:
        ap.error("--max-steps must be at least 1")
    return Options(api=ns.api, model=ns.model or DEFAULT_MODELS[ns.api],
                   prompt=" ".join(ns.prompt), max_steps=ns.max_steps,
                   writable=ns.writable,
                   stream=STREAM_DEFAULT[ns.api] if ns.stream is None else ns.stream,
                   max_tokens=ns.max_tokens, system=ns.system)


def main(argv: list[str] | None = None) -> int:
    if os.path.isdir(PYLIB) and PYLIB not in sys.path:
        sys.path.insert(0, PYLIB)  # `python3 -I` ignores PYTHONPATH: add the SDKs here
    import warnings

    # The model id is the policy's choice; an SDK's deprecation notice is noise here.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        opts = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    events = Events()
    loop = Loop(opts, events)
    try:
        return asyncio.run(loop.run())
    except KeyboardInterrupt:
        return loop.fail("agent", "interrupted")
    except Exception as exc:
        import traceback

        traceback.print_exc()
        return loop.fail("agent", _describe(exc))


if __name__ == "__main__":
    sys.exit(main())
