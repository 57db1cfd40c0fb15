"""The blocking client: `Client(server, key)`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from runner.client import _http as h
from runner.client.models import RunCreated, RunEvent, RunInfo


class Client:
    """A tenant's view of an Airlock service.

        with Client("http://127.0.0.1:8470", key) as c:
            run = c.submit(command=["pytest", "-q"])
            for event in c.events(run.id):
                print(event.type, event.data)
            print(c.get(run.id).status)
    """

    def __init__(self, server: str | None = None, key: str | None = None, *,
                 timeout: float = 30.0) -> None:
        server = server or os.environ.get(h.SERVER_ENV)
        if not server:
            raise h.BadRequest(f"no service given (--server or ${h.SERVER_ENV})")
        self.base, uds = h.split_server(server)
        self.key = key if key is not None else os.environ.get(h.KEY_ENV)
        self._http = httpx.Client(base_url=self.base, headers=h.headers(self.key),
                                  timeout=timeout,
                                  transport=httpx.HTTPTransport(uds=uds) if uds else None)

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise h.unreachable(self.base, exc) from None
        h.raise_for(resp)
        return resp.json() if resp.content else None

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz") or {}

    def submit(self, *, agent: str = "command", command: list[str] | None = None,
               task: str | None = None, model: str | None = None,
               policy: Mapping[str, Any] | str | Path | None = None,
               workspace: str | None = None, **extra: Any) -> RunCreated:
        body = h.run_body(agent=agent, command=command, task=task, model=model, policy=policy,
                          workspace=workspace, extra=extra)
        return RunCreated.model_validate(self._request("POST", "/v1/runs", json=body))

    def get(self, run_id: str) -> RunInfo:
        return RunInfo.model_validate(self._request("GET", f"/v1/runs/{run_id}"))

    def list(self, **params: Any) -> list[RunInfo]:
        data = self._request("GET", "/v1/runs", params=params)
        items = data.get("runs", data.get("items", [])) if isinstance(data, dict) else data
        return [RunInfo.model_validate(x) for x in items or []]

    def cancel(self, run_id: str) -> RunInfo:
        data = self._request("POST", f"/v1/runs/{run_id}/cancel")
        return RunInfo.model_validate(data) if data and "status" in data else self.get(run_id)

    def usage(self) -> dict[str, Any]:
        return self._request("GET", "/v1/usage") or {}

    def events(self, run_id: str, *, format: str = "sse",
               idle_timeout: float | None = None, after: int = 0) -> Iterator[RunEvent]:
        """The run's events from its first, as they happen, until the run ends (the
        service closes the stream). With `idle_timeout`, stop after that many seconds
        without a byte: what the run has logged so far, without waiting for more.
        `after`: resume after this sequence number (a stream that broke off)."""
        params = {"format": "jsonl"} if format == "jsonl" else None
        accept = "application/x-ndjson" if format == "jsonl" else "text/event-stream"
        hdrs = {"Accept": accept, **({"Last-Event-ID": str(after)} if after else {})}
        timeout = httpx.Timeout(30.0, read=idle_timeout)
        parser = h.EventParser("jsonl" if format == "jsonl" else "sse")
        try:
            with self._http.stream("GET", f"/v1/runs/{run_id}/events", params=params,
                                   headers=hdrs, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    h.raise_for(resp)
                try:
                    for line in resp.iter_lines():
                        if (event := parser.feed(line)) is not None and event.seq > after:
                            yield event
                except httpx.ReadTimeout:
                    if idle_timeout is None:
                        raise
                    return
        except httpx.TransportError as exc:
            raise h.unreachable(self.base, exc) from None
        if (event := parser.flush()) is not None and event.seq > after:
            yield event

    def wait(self, run_id: str, *, timeout: float | None = None,
             interval: float = 0.5) -> RunInfo:
        """Poll until the run has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.get(run_id)
            if info.ended:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {info.status}")
            time.sleep(interval)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
