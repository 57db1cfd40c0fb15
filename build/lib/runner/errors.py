"""Errors that end a command with one of the contract's exit codes (DESIGN.md)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    AGENT_FAILED = 1
    BAD_INPUT = 2
    NOT_READY = 3
    BUDGET_EXCEEDED = 4
    WALL_TIME = 124
    KILLED = 137


class AirlockError(Exception):
    """An error a user can act on: printed as one message, never as a traceback."""

    exit_code: ExitCode = ExitCode.AGENT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"

    def one_line(self) -> str:
        """The reason and the fix on one line: what a refused command prints."""
        text = " | ".join(part.strip() for part in self.message.splitlines() if part.strip())
        return f"{text}; fix: {self.hint}" if self.hint else text


class BadInput(AirlockError):
    exit_code = ExitCode.BAD_INPUT


class PolicyError(BadInput):
    """One or more `file:line: message` problems in a policy."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def one_line(self) -> str:
        first = self.problems[0] if self.problems else self.message
        more = len(self.problems) - 1
        return first if more <= 0 else (
            f"{first} (and {more} more: `airlock policy check` lists them)")


class NotReady(AirlockError):
    exit_code = ExitCode.NOT_READY
