"""The asyncio client: `AsyncClient(server, key)`, the same calls awaited."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from runner.client import _http as h
from runner.client.models import RunCreated, RunEvent, RunInfo


class AsyncClient:
    def __init__(self, server: str | None = None, key: str | None = None, *,
                 timeout: float = 30.0) -> None:
        server = server or os.environ.get(h.SERVER_ENV)
        if not server:
            raise h.BadRequest(f"no service given (--server or ${h.SERVER_ENV})")
        self.base, uds = h.split_server(server)
        self.key = key if key is not None else os.environ.get(h.KEY_ENV)
        self._http = httpx.AsyncClient(
            base_url=self.base, headers=h.headers(self.key), timeout=timeout,
            transport=httpx.AsyncHTTPTransport(uds=uds) if uds else None)

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise h.unreachable(self.base, exc) from None
        h.raise_for(resp)
        return resp.json() if resp.content else None

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/healthz") or {}

    async def submit(self, *, agent: str = "command", command: list[str] | None = None,
                     task: str | None = None, model: str | None = None,
                     policy: Mapping[str, Any] | str | Path | None = None,
                     workspace: str | None = None, **extra: Any) -> RunCreated:
        body = h.run_body(agent=agent, command=command, task=task, model=model, policy=policy,
                          workspace=workspace, extra=extra)
        return RunCreated.model_validate(await self._request("POST", "/v1/runs", json=body))

    async def get(self, run_id: str) -> RunInfo:
        return RunInfo.model_validate(await self._request("GET", f"/v1/runs/{run_id}"))

    async def list(self, **params: Any) -> list[RunInfo]:
        data = await self._request("GET", "/v1/runs", params=params)
        items = data.get("runs", data.get("items", [])) if isinstance(data, dict) else data
        return [RunInfo.model_validate(x) for x in items or []]

    async def cancel(self, run_id: str) -> RunInfo:
        data = await self._request("POST", f"/v1/runs/{run_id}/cancel")
        if data and "status" in data:
            return RunInfo.model_validate(data)
        return await self.get(run_id)

    async def usage(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/usage") or {}

    async def events(self, run_id: str, *, format: str = "sse",
                     idle_timeout: float | None = None, after: int = 0
                     ) -> AsyncIterator[RunEvent]:
        params = {"format": "jsonl"} if format == "jsonl" else None
        accept = "application/x-ndjson" if format == "jsonl" else "text/event-stream"
        hdrs = {"Accept": accept, **({"Last-Event-ID": str(after)} if after else {})}
        timeout = httpx.Timeout(30.0, read=idle_timeout)
        parser = h.EventParser("jsonl" if format == "jsonl" else "sse")
        try:
            async with self._http.stream("GET", f"/v1/runs/{run_id}/events", params=params,
                                         headers=hdrs, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    h.raise_for(resp)
                try:
                    async for line in resp.aiter_lines():
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

    async def wait(self, run_id: str, *, timeout: float | None = None,
                   interval: float = 0.5) -> RunInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = await self.get(run_id)
            if info.ended:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {info.status}")
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
