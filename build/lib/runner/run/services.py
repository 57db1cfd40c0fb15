"""Host-side services of a run (gateway, proxy, MCP) on one asyncio loop in a thread.

The orchestrator is synchronous (the engine SDK blocks); the services are asyncio. Each
service has `async start()` (returns once its socket listens) and `async aclose()`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio


class Service(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def raise_nofile_limit() -> int:
    """The soft descriptor limit raised to the hard one; the new soft limit.

    Every run's services share this process's descriptors; each service caps its own
    connections (runner/mcp/http_limits.py), and the headroom keeps many runs' worth of
    them from meeting a default soft limit of 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ServiceHost:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._services: list[Service] = []

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        import asyncio  # here, not at the top: runs without services never pay for it

        if self._loop is None:
            raise_nofile_limit()
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="airlock-services", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._loop

    def call(self, coro: Any, timeout: float = 30) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop()).result(timeout)

    def start(self, service: Service) -> None:
        self.call(service.start())
        self._services.append(service)

    def close(self) -> None:
        for service in reversed(self._services):
            with contextlib.suppress(Exception):
                self.call(service.aclose(), timeout=10)
        self._services.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._loop.close()
            self._loop = None
