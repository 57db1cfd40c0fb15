"""The Python API: build a policy, run a prompt or a command, watch events as they happen.

    from runner import execute, start

    result = execute(["echo", "hello"], agent="command", policy="strict")
    print(result.status, result.exit_code)

    with start("Fix the failing test", agent="builtin", workspace="repo") as handle:
        for event in handle.events():
            print(event.type, event.data)
    print(handle.result().patch)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from runner.agents import get_agent
from runner.events.log import Event
from runner.policy.loader import is_preset_ref, policy_from_dict
from runner.policy.loader import load_policy as _load_policy
from runner.policy.models import Policy
from runner.run.hostaddrs import host_addresses
from runner.run.orchestrator import RunOptions
from runner.run.orchestrator import run as _run
from runner.run.pool import Pool
from runner.run.report import RunResult
from runner.server.paths import default_socket

PolicyLike = Policy | str | Path | Mapping[str, Any]


def load_policy(ref: str | Path = "default") -> Policy:
    """A preset name or a policy file, resolved and validated."""
    return _load_policy(ref).policy


def as_policy(policy: PolicyLike) -> Policy:
    return _resolve(policy)[0]


def _resolve(policy: PolicyLike) -> tuple[Policy, str | None]:
    """The policy, and the preset it builds on (what it raises above is recorded)."""
    if isinstance(policy, Policy):
        return policy, None
    if isinstance(policy, Mapping):
        ref = policy.get("extends")
        preset = ref if isinstance(ref, str) and is_preset_ref(ref) else None
        return policy_from_dict(dict(policy)), preset
    loaded = _load_policy(policy)
    return loaded.policy, loaded.preset


def _options(task: str | Sequence[str], *, agent: str, policy: PolicyLike,
             workspace: str | Path | None, model: str | None,
             tools: Sequence[Callable[..., Any]], on_event: Callable[[Event], None] | None,
             record: str | Path | None, runs_dir: str | Path | None,
             on_output: Callable[[str, bytes], None] | None,
             pool: Pool | None = None) -> RunOptions:
    resolved, preset = _resolve(policy)
    return RunOptions(
        policy=resolved,
        preset=preset,
        agent=get_agent(agent),
        task=[task] if isinstance(task, str) else list(task),
        workspace=Path(workspace) if workspace is not None else None,
        model=model,
        record=Path(record) if record is not None else None,
        python_tools=list(tools),
        listeners=[on_event] if on_event else [],
        runs_dir=Path(runs_dir) if runs_dir is not None else None,
        on_output=on_output,
        host_addresses=host_addresses(),
        pool=pool,
        protected_sockets=[default_socket()],
    )


def execute(task: str | Sequence[str], *, agent: str = "builtin", policy: PolicyLike = "default",
        workspace: str | Path | None = None, model: str | None = None,
        tools: Sequence[Callable[..., Any]] = (), on_event: Callable[[Event], None] | None = None,
        record: str | Path | None = None, runs_dir: str | Path | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        pool: Pool | None = None) -> RunResult:
    """Run one task in a sandbox and return its result (blocking).

    With `pool` (a `runner.Pool`), a run without a workspace claims a warm sandbox of
    its boundary when one is ready, and starts cold otherwise.
    """
    return _run(_options(task, agent=agent, policy=policy, workspace=workspace, model=model,
                         tools=tools, on_event=on_event, record=record, runs_dir=runs_dir,
                         on_output=on_output, pool=pool))


def warm_pool(policy: PolicyLike = "default", *, agent: str = "command", size: int = 1,
              max_total: int | None = None, wait: bool = False, timeout: float = 120.0) -> Pool:
    """A `Pool` keeping `size` started sandboxes of this policy's and agent's boundary;
    pass it to `execute(..., pool=...)` or `start(..., pool=...)`. Runs of other
    boundaries that use it teach it theirs. With `wait`, returns once they are ready."""
    from runner.engines import get_engine
    from runner.images.build import image_tag
    from runner.run.orchestrator import with_agent_tmpfs
    from runner.run.pool import Recipe

    a = get_agent(agent)
    recipe = Recipe(with_agent_tmpfs(as_policy(policy), a), image_tag(a.image))
    pool = Pool(get_engine(), max_total=max(size, max_total or size))
    pool.add(recipe, size)
    if wait and not pool.wait_ready(recipe, size, timeout=timeout):
        pool.close()
        raise TimeoutError(f"the pool's sandboxes were not ready within {timeout:.0f} s")
    return pool


class RunHandle:
    """A run in a background thread whose events can be iterated as they happen.

    Every call of `events()` yields the run's events from the first, then the new ones
    as they come, and ends when the run does: a second loop replays, never hangs. The
    events are kept in memory for that (the run's log cap, resources.log_bytes, bounds
    them).
    """

    def __init__(self, options: RunOptions) -> None:
        self._events: list[Event] = []
        self._done = False
        self._changed = threading.Condition()
        options.listeners.append(self._add)
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._go, args=(options,), daemon=True)
        self._thread.start()

    def _add(self, event: Event) -> None:
        with self._changed:
            self._events.append(event)
            self._changed.notify_all()

    def _go(self, options: RunOptions) -> None:
        try:
            self._result = _run(options)
        except BaseException as exc:  # handed to the caller in result()
            self._error = exc
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def events(self) -> Iterator[Event]:
        seen = 0
        while True:
            with self._changed:
                while seen >= len(self._events) and not self._done:
                    self._changed.wait()
                batch = self._events[seen:]
                done = self._done
            yield from batch
            seen += len(batch)
            if done and seen >= len(self._events):
                return

    def result(self, timeout: float | None = None) -> RunResult:
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise TimeoutError("the run has not finished")
        return self._result

    def __enter__(self) -> RunHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()


def start(task: str | Sequence[str], *, agent: str = "builtin", policy: PolicyLike = "default",
          workspace: str | Path | None = None, model: str | None = None,
          tools: Sequence[Callable[..., Any]] = (), record: str | Path | None = None,
          runs_dir: str | Path | None = None, pool: Pool | None = None) -> RunHandle:
    """Start a run in the background; iterate `handle.events()`, then `handle.result()`."""
    return RunHandle(_options(task, agent=agent, policy=policy, workspace=workspace,
                              model=model, tools=tools, on_event=None, record=record,
                              runs_dir=runs_dir, on_output=None, pool=pool))
