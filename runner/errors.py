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


class BadInput(AirlockError):
    exit_code = ExitCode.BAD_INPUT


class PolicyError(BadInput):
    """One or more `file:line: message` problems in a policy."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class NotReady(AirlockError):
    exit_code = ExitCode.NOT_READY
