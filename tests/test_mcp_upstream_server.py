"""A tiny upstream MCP server that tests/test_mcp.py starts as the host would.

Not a test module (pytest collects nothing here). Three tools; the tests enable two of
them, so `admin_reset` must stay invisible and uncallable from the sandbox side.
Speaks stdio by default; with `--http` it serves Streamable HTTP on a free loopback port
and prints that port on its first line.
"""

from __future__ import annotations

import socket
import sys


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

    if "--http" not in sys.argv:
        server.run()
        return

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # before the port is announced: connections queue until uvicorn serves
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(server.streamable_http_app(), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
