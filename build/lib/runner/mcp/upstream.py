"""Upstream MCP servers: started or reached by the host, filtered, and proxied to the agent.

The upstream runs on the host side of the boundary. The sandbox never sees its address or
process, only the tools its `enabled_tools` names, re-exposed by the run's own server; its
other tools are never listed to the agent and cannot be called through it.
"""

from __future__ import annotations

import shlex
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, TextIO
from urllib.parse import urlsplit

import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from runner.errors import NotReady
from runner.mcp.errors import ToolFailure, ToolSpecError, root_cause
from runner.policy.models import McpServerPolicy

# A server that keeps returning cursors must not hang the run's start.
MAX_LIST_PAGES = 100


def upstream_label(spec: McpServerPolicy) -> str:
    """A short name for events and errors that carries no credential from the spec."""
    if spec.command:
        argv = shlex.split(spec.command)
        # The program, and its first operand when there is one (`python server.py`, `npx pkg`);
        # later arguments are where credentials get passed, so they are left out.
        words = [PurePath(a).name for a in argv[:2] if not a.startswith("-")]
        return f"stdio:{' '.join(words) or '?'}"
    parts = urlsplit(spec.url or "")
    port = f":{parts.port}" if parts.port else ""
    # Userinfo and query strings are where URLs carry secrets; neither goes in the log.
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


@dataclass(frozen=True)
class UpstreamTool:
    definition: types.Tool
    server: str
    client: Client

    @property
    def origin(self) -> str:
        return f"upstream:{self.server}"

    async def call(self, arguments: dict[str, Any]) -> types.CallToolResult:
        try:
            # An upstream tool that fails answers with is_error=True, returned as it is.
            return await self.client.call_tool(self.definition.name, arguments)
        except MCPError as exc:
            # A protocol error is the upstream server's own answer, written for clients.
            raise ToolFailure(f"{self.server}: {exc.message}") from exc


@dataclass(frozen=True)
class Upstream:
    label: str
    exposed: list[UpstreamTool]
    hidden: list[str]


async def open_upstream(
    spec: McpServerPolicy, stack: AsyncExitStack, errlog: TextIO | None = None
) -> Upstream:
    """Start or reach one upstream server for the lifetime of `stack`; keep its enabled tools.

    A started server's stderr goes to `errlog` (the host's stderr by default). Its
    environment is the SDK's default: a few basics such as PATH and HOME, not the host's.
    """
    label = upstream_label(spec)
    if spec.command:
        argv = shlex.split(spec.command)
        if not argv:
            raise ToolSpecError("an upstream MCP server has an empty command")
        params = StdioServerParameters(command=argv[0], args=argv[1:])
        target: Any = stdio_client(params, errlog=errlog or sys.stderr)
    else:
        target = spec.url or ""
    # No response cache: the listing is read once, here, and must be the upstream's own.
    client = Client(target, cache=None)
    try:
        await stack.enter_async_context(client)
        listed = await _list_tools(client)
    except Exception as exc:
        cause = root_cause(exc)
        raise NotReady(
            f"upstream MCP server {label} is not available: {type(cause).__name__}: {cause}"
        ) from exc

    by_name = {tool.name: tool for tool in listed}
    missing = [name for name in spec.enabled_tools if name not in by_name]
    if missing:
        raise ToolSpecError(
            f"upstream MCP server {label} has no tool {', '.join(missing)} "
            f"(it offers: {', '.join(sorted(by_name)) or 'nothing'})"
        )
    enabled = set(spec.enabled_tools)
    exposed = [
        UpstreamTool(_forwarded_definition(by_name[name]), label, client)
        for name in spec.enabled_tools
    ]
    hidden = sorted(name for name in by_name if name not in enabled)
    return Upstream(label, exposed, hidden)


async def _list_tools(client: Client) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(MAX_LIST_PAGES):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _forwarded_definition(tool: types.Tool) -> types.Tool:
    # Only what describes the tool to a model; upstream `_meta` and icons may carry
    # upstream URLs the sandbox has no business knowing.
    return types.Tool(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=tool.annotations,
    )
