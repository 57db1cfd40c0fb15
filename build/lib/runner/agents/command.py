"""`--agent command`: any command, run as given inside the sandbox."""

from __future__ import annotations

from runner.agents.base import Agent, AgentContext
from runner.errors import BadInput


class CommandAgent(Agent):
    name = "command"
    image = "base"
    passthrough_exit = True
    structured_stdout = False

    def argv(self, ctx: AgentContext) -> list[str]:
        if not ctx.task:
            raise BadInput("--agent command needs a command after `--`")
        # One argument with shell syntax in it is a shell command line, as with `docker run
        # IMAGE sh -c`; several arguments are an argv, run without a shell.
        if len(ctx.task) == 1 and any(c in ctx.task[0] for c in " ;|&$<>()`*?~\n"):
            return ["/bin/sh", "-c", ctx.task[0]]
        return list(ctx.task)
