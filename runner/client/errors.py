"""The service's HTTP errors as typed exceptions, each with the CLI's exit code."""

from __future__ import annotations

from runner.errors import AirlockError, ExitCode


class ServiceError(AirlockError):
    """An error answer from the service (or none at all)."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    """400, 413 or 422: the request was malformed, too large, or invalid."""

    exit_code = ExitCode.BAD_INPUT


class Unauthorized(ServiceError):
    """401: no key, or not a key the service knows."""

    exit_code = ExitCode.BAD_INPUT
    status = 401


class Forbidden(ServiceError):
    """403: the run's policy would widen the tenant's floor (the message names the key)."""

    exit_code = ExitCode.BAD_INPUT
    status = 403


class NotFound(ServiceError):
    """404: no such run for this tenant (another tenant's run answers the same)."""

    exit_code = ExitCode.BAD_INPUT
    status = 404


class QuotaExceeded(ServiceError):
    """429: over one of the tenant's quotas; `retry_after_s` says when to come back."""

    exit_code = ExitCode.BUDGET_EXCEEDED
    status = 429

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """The service did not answer, or answered 5xx: the environment is not ready."""

    exit_code = ExitCode.NOT_READY
