"""The run's MCP server: only the run's tools, every call on the record.

One instance per run, served over Streamable HTTP on the run's `mcp` unix socket, which
the in-sandbox shim exposes at http://127.0.0.1:<port>/mcp. The tools are the run's
Python callables, the enabled tools of upstream servers the host starts or reaches, and
the built-ins the policy enables; nothing else can be listed or called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError

from runner.errors import NotReady
from runner.events.budgets import Budgets
from runner.events.log import EventSink
from runner.mcp import audit
from runner.mcp.app import LOOPBACK_ONLY, URL_PATH, build_app
from runner.mcp.auth import check_token
from runner.mcp.builtin import ResultSlot, builtin_tools
from runner.mcp.errors import ToolFailure, ToolSpecError, root_cause
from runner.mcp.http_limits import HttpGuard, HttpLimits, guarded_protocol
from runner.mcp.limits import CallGate, Refusal
from runner.mcp.listener import EmbeddedServer, bind_unix_socket
from runner.mcp.tools import PythonTool, RunTool, resolve_callable
from runner.mcp.upstream import open_upstream
from runner.policy.models import McpPolicy

MAX_SESSIONS = 32
START_TIMEOUT_S = 20.0


class RunMcpServer:
    url_path = URL_PATH

    def __init__(
        self,
        mcp: McpPolicy,
        socket_path: Path,
        token: str,
        sink: EventSink,
        budgets: Budgets,
        *,
        python_tools: Sequence[Callable[..., Any]] = (),
        upstream_log: Path | None = None,
        start_timeout: float = START_TIMEOUT_S,
        limits: HttpLimits | None = None,
        on_abuse: Callable[[str], None] | None = None,
    ) -> None:
        """`upstream_log`: a file (appended to) for the stderr of upstream servers the host
        starts, instead of the host's own stderr. `start_timeout`: how long upstream servers
        may take to start and list their tools. `limits`: what the listener may cost the
        host (runner/mcp/http_limits.py); `on_abuse` is called once when the sandbox keeps
        going past them, to end the run."""
        check_token(token)
        self._policy = mcp
        self._socket_path = Path(socket_path)
        self._token = token
        self._sink = sink
        self._python_tools = list(python_tools)
        self._upstream_log = upstream_log
        self._start_timeout = start_timeout
        self._gate = CallGate(budgets, mcp.per_tool_calls)
        self._slot = ResultSlot()
        self._tools: dict[str, RunTool] = {}
        self._http: EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._accepting = True
        self._counts = {"calls": 0, "refused": 0, "unauthorized": 0}
        self._guard = HttpGuard(limits or HttpLimits(), sink, on_abuse)

    # -- what the orchestrator and the agent adapters read ---------------------------------

    @property
    def result(self) -> str | None:
        """What `submit_result` last received, or None."""
        return self._slot.value

    @property
    def tool_names(self) -> list[str]:
        """The exposed tools (complete once `start()` has returned): what adapters auto-approve."""
        return list(self._tools)

    @property
    def tools(self) -> list[types.Tool]:
        return [tool.definition for tool in self._tools.values()]

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the tools, start the upstreams, and return once the socket is listening.

        Raises ToolSpecError (bad input) for a tool entry that cannot be used and NotReady
        for an upstream server that cannot be started or reached.
        """
        if self._task is not None:
            raise RuntimeError("this MCP server was already started")
        # Local tools first, in the caller's frame: a bad entry fails before any process starts.
        local = self._local_tools()
        manager = StreamableHTTPSessionManager(
            app=self._protocol_server(), security_settings=LOOPBACK_ONLY,
            # One agent needs a session or two; each costs the host a task and buffers.
            max_sessions=MAX_SESSIONS,
        )
        app = build_app(manager, self._token, self._rejected, lambda: self._accepting,
                        self._guard)
        self._http = EmbeddedServer(app, http=guarded_protocol(self._guard),
                                    backlog=self._guard.limits.backlog)
        self._task = asyncio.create_task(self._serve(local, manager), name="airlock-mcp")
        listening = asyncio.create_task(self._http.listening.wait())
        try:
            await asyncio.wait({self._task, listening}, timeout=self._start_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if not self._task.done() and not listening.done():
                raise NotReady(f"the run's MCP server did not start within "
                               f"{self._start_timeout:g}s (an upstream server hangs?)")
        except BaseException:  # cancelled or too slow: take the half-started server down
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            raise
        finally:
            listening.cancel()
        if not self._http.listening.is_set():
            task, self._task = self._task, None
            await task  # raises what stopped it
            raise RuntimeError("the MCP server stopped before it was listening")
        self._sink.emit(
            "mcp.started", "mcp", socket=str(self._socket_path), path=URL_PATH,
            tools=[{"name": n, "origin": t.origin} for n, t in self._tools.items()],
        )

    async def aclose(self) -> None:
        """Stop serving, end open sessions, and stop the upstream servers the host started."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        error = None
        try:
            await task
        except Exception as exc:  # a crash while serving is reported, not raised at teardown
            error = f"{type(exc).__name__}: {exc}"
        self._sink.emit("mcp.stopped", "mcp", **self._counts, dropped=dict(self._guard.drops),
                        result_submitted=self._slot.value is not None, error=error)

    async def __aenter__(self) -> RunMcpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals -------------------------------------------------------------------------

    def _local_tools(self) -> list[RunTool]:
        fns = [*self._python_tools, *(resolve_callable(e) for e in self._policy.tools)]
        tools: list[RunTool] = [PythonTool(fn) for fn in fns]
        tools.extend(builtin_tools(self._policy.builtin, self._slot))
        return tools

    async def _serve(self, local: list[RunTool], manager: StreamableHTTPSessionManager) -> None:
        try:
            await self._serve_in_stack(local, manager)
        except BaseExceptionGroup as group:
            raise root_cause(group) from None

    async def _serve_in_stack(
        self, local: list[RunTool], manager: StreamableHTTPSessionManager
    ) -> None:
        assert self._http is not None
        # Everything entered here is left in this same task, as the SDK's task groups need.
        async with AsyncExitStack() as stack:
            tools = list(local)
            errlog = None
            if self._upstream_log is not None and self._policy.servers:
                errlog = stack.enter_context(self._upstream_log.open("a", encoding="utf-8"))
            for spec in self._policy.servers:
                upstream = await open_upstream(spec, stack, errlog)
                self._sink.emit("mcp.upstream", "mcp", server=upstream.label,
                                exposed=[t.definition.name for t in upstream.exposed],
                                hidden=upstream.hidden)
                tools.extend(upstream.exposed)
            self._tools = _by_name(tools)
            sock = bind_unix_socket(self._socket_path)
            stack.callback(self._socket_path.unlink, missing_ok=True)
            stack.callback(sock.close)
            serving: asyncio.Task[None] | None = None
            try:
                async with manager.run():
                    serving = asyncio.create_task(self._http.serve(sockets=[sock]))
                    stop = asyncio.create_task(self._stopping.wait())
                    try:
                        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stop.cancel()
                    # New requests get 503 while leaving the manager ends the sessions.
                    self._accepting = False
            finally:
                # Sessions ended with the manager, and their open streams with them, so the
                # HTTP server has only idle connections left and stops at once.
                if serving is not None:
                    self._http.should_exit = True
                    await serving

    def _protocol_server(self) -> Server[Any]:
        return Server("airlock-run", on_list_tools=self._list_tools, on_call_tool=self._call_tool)

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        name, arguments = params.name, dict(params.arguments or {})
        refusal = self._gate.admit(name)
        tool = self._tools.get(name)
        if refusal is None and tool is None:
            refusal = Refusal("not_exposed", f"Unknown tool: {name}")
        if refusal is not None:
            return self._refuse(name, arguments, refusal)
        assert tool is not None

        logged = audit.logged_arguments(arguments)
        # On the record before it runs, or not run: a call the log cannot take (it is
        # full, the disk refused it) would happen unseen.
        if self._sink.emit("mcp.call_started", "mcp", tool=name, origin=tool.origin,
                           **logged) is None:
            self._counts["refused"] += 1
            return _error_result("the run's record is full; no more tool calls")
        self._counts["calls"] += 1
        started = time.monotonic()
        result: types.CallToolResult | None = None
        # Stays "cancelled" if the client goes away mid-call: the call is still recorded.
        error: str | None = "cancelled"
        try:
            result, error = await _run(tool, arguments)
            return result
        finally:
            self._sink.emit(
                "mcp.call", "mcp", tool=name, origin=tool.origin, **logged,
                result_bytes=audit.result_bytes(result) if result is not None else 0,
                duration_ms=round((time.monotonic() - started) * 1000, 3),
                ok=error is None, error=error,
            )

    def _refuse(
        self, name: str, arguments: dict[str, Any], refusal: Refusal
    ) -> types.CallToolResult:
        self._counts["refused"] += 1
        self._sink.refusal("mcp.refused", "mcp", tool=name, reason=refusal.reason,
                           limit=refusal.limit, **audit.logged_arguments(arguments))
        if refusal.reason == "not_exposed":
            # As for any unknown tool: a protocol error, which says nothing of what else exists.
            raise MCPError(code=types.INVALID_PARAMS, message=refusal.message)
        return _error_result(refusal.message)

    def _rejected(self, reason: str, method: str, path: str) -> None:
        self._counts["unauthorized"] += 1
        # Capped per run by the log (the rest only counted, in mcp.stopped and the log's
        # summary): a client hammering the socket without the token cannot flood it.
        self._sink.refusal("mcp.unauthorized", "mcp", kind="request", reason=reason,
                           method=method, path=path)


async def _run(tool: RunTool, arguments: dict[str, Any]) -> tuple[types.CallToolResult, str | None]:
    """Call the tool; a failure becomes an is_error result for the agent and text for the log."""
    name = tool.definition.name
    try:
        result = await tool.call(arguments)
    except ToolFailure as exc:
        return _error_result(str(exc)), audit.capped(str(exc))
    except Exception as exc:
        # The run goes on; the agent learns the type only (see ToolFailure), the log all of it.
        return (_error_result(f"{name} failed ({type(exc).__name__})"),
                audit.capped(f"{type(exc).__name__}: {exc}"))
    return result, audit.result_error_text(result) if result.is_error else None


def _error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                is_error=True)


def _by_name(tools: Iterable[RunTool]) -> dict[str, RunTool]:
    out: dict[str, RunTool] = {}
    for tool in tools:
        name = tool.definition.name
        if name in out:
            raise ToolSpecError(
                f"two MCP tools of this run are named {name!r} "
                f"({out[name].origin} and {tool.origin})"
            )
        out[name] = tool
    return out
