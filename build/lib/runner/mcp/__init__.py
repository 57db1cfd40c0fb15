"""The host-side MCP server of a run: only the run's tools, every call an event."""

from runner.mcp.app import URL_PATH
from runner.mcp.auth import new_token
from runner.mcp.errors import ToolFailure, ToolSpecError
from runner.mcp.server import RunMcpServer
from runner.mcp.tools import resolve_callable

__all__ = ["URL_PATH", "RunMcpServer", "ToolFailure", "ToolSpecError", "new_token",
           "resolve_callable"]
