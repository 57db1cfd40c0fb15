"""What the sync and async clients share: addresses, requests, answers, event streams."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from runner.client.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    QuotaExceeded,
    ServiceError,
    Unauthorized,
    Unavailable,
)
from runner.client.models import RunEvent

KEY_ENV = "AIRLOCK_KEY"
SERVER_ENV = "AIRLOCK_SERVER"
UDS_BASE = "http://airlock"  # the host name requests carry over a unix socket


def split_server(server: str) -> tuple[str, str | None]:
    """The base URL and, for `unix:/path` (the config's `listen` form), the socket."""
    server = server.strip()
    if server.startswith("unix:"):
        return UDS_BASE, server[len("unix:"):]
    if "://" not in server:
        server = "http://" + server  # host:port, as in the config's `listen`
    return server.rstrip("/"), None


def headers(key: str | None) -> dict[str, str]:
    out = {"Accept": "application/json", "User-Agent": "airlock-client"}
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


def run_body(*, agent: str, command: list[str] | None, task: str | None, model: str | None,
             policy: Mapping[str, Any] | str | Path | None, workspace: str | None,
             extra: Mapping[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"agent": agent}
    if command is not None:
        body["command"] = list(command)
    if task is not None:
        body["task"] = task
    if model is not None:
        body["model"] = model
    if isinstance(policy, Path):
        body["policy"] = policy.read_text()  # YAML text: the service parses and checks it
    elif policy is not None:
        body["policy"] = policy if isinstance(policy, str) else dict(policy)
    if workspace is not None:
        body["workspace"] = workspace
    body.update(extra)
    return body


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        return text.splitlines()[0][:500] if text else resp.reason_phrase
    if isinstance(body, dict):
        for name in ("error", "message", "detail"):
            value = body.get(name)
            if isinstance(value, str):
                return value
            if isinstance(value, list):  # validation errors: one line per problem
                return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v)
                                 for v in value)
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
    return json.dumps(body)[:500]


def raise_for(resp: httpx.Response) -> None:
    """Typed exceptions for error answers (the body must have been read)."""
    code = resp.status_code
    if code < 400:
        return
    msg = f"{code}: {_message(resp)}"
    if code == 401:
        raise Unauthorized(msg)
    if code == 403:
        raise Forbidden(msg)
    if code == 404:
        raise NotFound(msg)
    if code == 429:
        retry = resp.headers.get("Retry-After")
        try:
            after = float(retry) if retry is not None else None
        except ValueError:
            after = None
        raise QuotaExceeded(msg + (f" (retry after {retry} s)" if retry else ""),
                            retry_after_s=after)
    if code in (400, 405, 409, 413, 415, 422):
        raise BadRequest(msg, status=code)
    if code >= 500:
        raise Unavailable(msg, status=code)
    raise ServiceError(msg, status=code)


def unreachable(base: str, exc: Exception) -> Unavailable:
    return Unavailable(f"the service at {base} did not answer: {type(exc).__name__}: {exc}"
                       .rstrip(": "),
                       hint=f"check that --server (or ${SERVER_ENV}) names a running "
                       f"`airlock serve --config`; its {base.rstrip('/')}/healthz answers "
                       "without a key")


class EventParser:
    """Events out of a `text/event-stream` or JSON-lines body, fed line by line."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._data: list[str] = []

    def feed(self, line: str) -> RunEvent | None:
        if self.fmt == "jsonl":
            return self._event("\n".join([line])) if line.strip() else None
        if not line:  # a blank line ends one server-sent event
            data, self._data = "\n".join(self._data), []
            return self._event(data) if data else None
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> RunEvent | None:
        return self.feed("") if self.fmt != "jsonl" else None

    @staticmethod
    def _event(data: str) -> RunEvent | None:
        try:
            obj = json.loads(data)
        except ValueError:
            return None
        if not isinstance(obj, dict) or "seq" not in obj:
            return None  # not an event of the run's log (an end marker, say)
        return RunEvent.model_validate(obj)
