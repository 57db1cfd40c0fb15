"""Errors of the run's MCP server."""

from __future__ import annotations

from runner.errors import BadInput


class ToolSpecError(BadInput, ValueError):
    """A tool entry that cannot be turned into a tool (bad input: exit code 2)."""


class ToolFailure(Exception):
    """A failed call whose message is meant for the agent to read.

    Anything else a tool raises reaches the agent only as its exception type: the text of
    an unexpected host-side exception (paths, connection strings) stays in the host's log.
    """


def root_cause(exc: BaseException) -> BaseException:
    """The first leaf of nested exception groups; `exc` itself when it is not a group.

    The SDK's task groups wrap whatever crosses them, so an error raised while upstream
    clients are open arrives as a group; callers should see the error itself.
    """
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
