"""Python callables that tests expose to a run as MCP tools (`--mcp-tool tests.mcp_tools:add`)."""

from __future__ import annotations


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def shout(text: str) -> str:
    """Upper-case the text."""
    return text.upper()
