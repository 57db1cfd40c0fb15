"""Built-in run tools: tools the host itself provides when the policy enables them."""

from __future__ import annotations

from collections.abc import Sequence

from runner.mcp.errors import ToolSpecError
from runner.mcp.tools import PythonTool


class ResultSlot:
    """What `submit_result` received; the last submission wins, so an agent can correct itself."""

    def __init__(self) -> None:
        self.value: str | None = None


def _submit_result_tool(slot: ResultSlot) -> PythonTool:
    async def submit_result(result: str) -> str:
        """Hand the final result of this run to the host, which puts it in the run's report.

        Call it once you are done; calling it again replaces the earlier result.
        """
        slot.value = result
        return "result recorded"

    return PythonTool(submit_result, origin="builtin")


def builtin_tools(names: Sequence[str], slot: ResultSlot) -> list[PythonTool]:
    tools = []
    for name in names:
        if name == "submit_result":
            tools.append(_submit_result_tool(slot))
        else:  # the policy model only admits known names; this guards direct callers
            raise ToolSpecError(f"unknown built-in MCP tool {name!r}")
    return tools
