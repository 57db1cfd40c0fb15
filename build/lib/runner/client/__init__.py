"""A Python client for an Airlock service (`airlock serve --config`), sync and async.

    from runner.client import Client

    with Client("http://127.0.0.1:8470", key) as c:      # key: $AIRLOCK_KEY by default
        run = c.submit(command=["pytest", "-q"], policy={"extends": "strict"})
        for event in c.events(run.id):                    # SSE; format="jsonl" for JSON lines
            ...
        info = c.get(run.id)                              # status, exit_code, usage

Errors are typed (`Unauthorized`, `Forbidden`, `NotFound`, `QuotaExceeded` with
`retry_after_s`, `BadRequest`, `Unavailable`), each with the exit code the CLI uses.
"""

from runner.client.aio import AsyncClient
from runner.client.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    QuotaExceeded,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from runner.client.models import RunCreated, RunEvent, RunInfo, RunStatus
from runner.client.sync import Client

__all__ = ["AsyncClient", "BadRequest", "Client", "Forbidden", "NotFound", "QuotaExceeded",
           "RunCreated", "RunEvent", "RunInfo", "RunStatus", "ServiceError", "Unauthorized",
           "Unavailable"]
