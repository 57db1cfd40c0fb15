"""Run tools: the common shape of everything the run's MCP server exposes, and Python callables.

A run tool is a definition (what `tools/list` shows the agent) plus an async `call`. Python
callables get their schema from their type hints through the SDK's own function inspection,
so the schema the agent sees and the validation its arguments go through are one thing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import mcp_types as types
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools.base import Tool as SdkTool
from pydantic import ValidationError

from runner.mcp.errors import ToolFailure, ToolSpecError


class RunTool(Protocol):
    @property
    def definition(self) -> types.Tool: ...

    @property
    def origin(self) -> str:
        """Where the tool runs, for the event log: python, builtin, or upstream:<server>."""
        ...

    async def call(self, arguments: dict[str, Any]) -> types.CallToolResult: ...


def resolve_callable(entry: str) -> Callable[..., Any]:
    """`package.module:function` (or `module:Class.method`) to the callable it names."""
    module_name, sep, attr_path = entry.partition(":")
    if not sep or not module_name or not attr_path:
        raise ToolSpecError(f"MCP tool {entry!r}: expected module:function")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a module that fails while importing is as unusable as a missing one
        raise ToolSpecError(
            f"MCP tool {entry!r}: cannot import module {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ToolSpecError(
                f"MCP tool {entry!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise ToolSpecError(f"MCP tool {entry!r}: {attr_path!r} is not callable")
    return target


class PythonTool:
    """A host-side Python callable; sync callables run on a worker thread."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        origin: str = "python",
    ) -> None:
        label = name or getattr(fn, "__qualname__", repr(fn))
        try:
            spec = SdkTool.from_function(fn, name=name, description=description)
        except Exception as exc:
            raise ToolSpecError(f"MCP tool {label!r}: {exc}") from exc
        # The run's tools are called by a remote agent with JSON only: a parameter the SDK
        # would fill from server state (its Context, resolvers) has nothing to fill it here.
        if spec.context_kwarg is not None or spec.resolved_params:
            raise ToolSpecError(
                f"MCP tool {spec.name!r}: parameters filled by the server (Context, Resolve) "
                "are not supported for run tools"
            )
        self._spec = spec
        self._origin = origin
        self._definition = types.Tool(
            name=spec.name,
            title=spec.title,
            description=spec.description or None,
            input_schema=spec.parameters,
            output_schema=spec.output_schema,
        )

    @property
    def definition(self) -> types.Tool:
        return self._definition

    @property
    def origin(self) -> str:
        return self._origin

    async def call(self, arguments: dict[str, Any]) -> types.CallToolResult:
        meta = self._spec.fn_metadata
        try:
            validated = meta.validate_arguments(arguments)
        except ValidationError as exc:
            # The caller's own mistake, so the agent may read it to correct the call.
            raise ToolFailure(f"invalid arguments for {self._spec.name}: {exc}") from exc
        try:
            value = await meta.call_fn(self._spec.fn, self._spec.is_async, validated)
        except ToolError as exc:
            # The SDK's way for a tool author to say "show this message to the model".
            raise ToolFailure(str(exc)) from exc
        result = meta.convert_result(value)
        if not isinstance(result, types.CallToolResult):
            # An input_required round trip needs a client callback the run does not have.
            raise ToolFailure(f"{self._spec.name} asked for input, which run tools cannot do")
        return result
