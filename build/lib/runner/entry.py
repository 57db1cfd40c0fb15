"""The `airlock` command's entry point: as little as possible before a run starts.

`airlock run` first offers the run to a warm `airlock serve` through a standard-library
client (`runner.server.client`); only when none takes it is the full CLI imported
(typer, pydantic, the docker SDK). Importing `runner.cli` just to reach this decision
cost more than the decision itself.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


def _remote(args: list[str]) -> bool:
    """`airlock run --server URL`: a run for a service, not for the per-user server."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--server" or arg.startswith("--server="):
            return True
    return False


def main(full_cli: Callable[[], None] | None = None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run" and not _remote(sys.argv[2:]):
        from runner.server.client import run_via_server

        code = run_via_server(sys.argv[2:])
        if code is not None:
            import os

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # nothing to finalise: the thin client imported next to nothing
    if full_cli is None:
        from runner.cli import cli_main

        full_cli = cli_main
    full_cli()


if __name__ == "__main__":
    main()
