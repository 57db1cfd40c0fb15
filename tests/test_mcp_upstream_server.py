"""A tiny upstream MCP server (stdio) that tests/test_mcp.py starts as the host would.

Not a test module (pytest collects nothing here). Three tools; the tests enable two of
them, so `admin_reset` must stay invisible and uncallable from the sandbox side.
"""

from __future__ import annotations


def main() -> None:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("upstream-fixture")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text."""
        return f"upstream says {text}"

    @server.tool()
    def explode(reason: str) -> str:
        """Always fails, as a broken upstream tool would."""
        raise RuntimeError(f"upstream exploded: {reason}")

    @server.tool()
    def admin_reset() -> str:
        """A tool the run did not enable."""
        return "reset done"

    server.run()


if __name__ == "__main__":
    main()
