"""One claimed run, on this host, through the one orchestration path (`runner.run`).

The request was checked when it was queued (floor, workspace, agent); what it carries
is the effective policy, so any host can run it as it was accepted. What is built here,
per run and never in the service's own `os.environ`, is the run's environment: the
tenant's provider keys, read from the service variables its config names, and the
values of the `env.allow` names its floor permits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runner.agents import get_agent
from runner.engines.base import Engine
from runner.policy.models import Policy
from runner.run.guard import check_workspace
from runner.run.orchestrator import Run, RunOptions
from runner.run.pool import SandboxSource
from runner.run.report import RunResult
from runner.service.accounting import RunMeter
from runner.service.config import TenantConfig
from runner.service.floors import Refused, recheck_workspace
from runner.service.pin import Moved, Pinned

log = logging.getLogger("airlock.service")

# The orchestrator's statuses, as the service's contract names them.
STATUS = {
    "succeeded": "succeeded", "failed": "failed", "budget_exceeded": "budget",
    "timeout": "timeout", "cancelled": "cancelled", "interrupted": "cancelled",
}


def service_status(result: RunResult) -> str:
    # oom, not_ready, error, engine_lost: the run failed; exit_reason says why.
    return STATUS.get(result.status, "failed")


def run_environment(tenant: TenantConfig, environ: Mapping[str, str] = os.environ
                    ) -> dict[str, str]:
    """The variables this tenant's run may see on the host side, and nothing else."""
    env = {name: environ[name] for name in tenant.floor.env.allow if name in environ}
    for run_var, service_var in tenant.provider_keys.items():
        value = environ.get(service_var)
        if value:
            env[run_var] = value
    return env


def tenant_dir(runs_dir: Path, tenant: str) -> Path:
    """The tenant's directory of run directories: the service's alone (0700)."""
    path = runs_dir / tenant
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def with_daily_tokens(policy: Policy, remaining: float | None) -> Policy:
    """The run's token budget lowered to what the tenant has left today (a tightening)."""
    if remaining is None:
        return policy
    left = max(1, int(remaining))
    if policy.budgets.tokens is not None and policy.budgets.tokens <= left:
        return policy
    data = policy.model_dump(mode="json")
    data["budgets"]["tokens"] = left
    return Policy.model_validate(data)


class Execution:
    """A run in its own thread; `cancel()` ends it from anywhere."""

    def __init__(self, *, run_id: str, tenant: TenantConfig, request: Mapping[str, Any],
                 runs_dir: Path, engine: Engine | None, host_addresses: list[str],
                 tokens_left: float | None,
                 on_container: Callable[[str, str, str | None], None],
                 on_end: Callable[[Execution], None],
                 pool: SandboxSource | None = None) -> None:
        self.run_id = run_id
        self.tenant = tenant
        self.request = dict(request)
        self.meter = RunMeter(engine)
        self.result: RunResult | None = None
        self.error: str | None = None
        self.error_reason = "error"
        self._pinned: Pinned | None = None
        self._engine = engine
        self._runs_dir = runs_dir
        self._host_addresses = host_addresses
        self._tokens_left = tokens_left
        self._on_container = on_container
        self._on_end = on_end
        self._pool = pool
        self._run: Run | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        self.run_dir = tenant_dir(runs_dir, tenant.name) / run_id
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._go, name=f"airlock-run-{run_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            run = self._run
        if run is not None:
            run.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _options(self) -> RunOptions:
        r = self.request
        policy = with_daily_tokens(Policy.model_validate(r["policy"]), self._tokens_left)
        agent = get_agent(r["agent"])
        if r.get("image"):
            agent.image = r["image"]
        task = list(r["command"]) if r["agent"] == "command" else [r["task"]]
        self.meter.on_container.append(
            lambda cid: self._on_container(self.run_id, str(self.run_dir), cid))
        workspace = None
        if r.get("workspace"):
            accepted = recheck_workspace(self.tenant, Path(r["workspace"]))
            # The orchestrator checks the pinned path; the tenant's own is checked here.
            try:
                check_workspace(accepted, policy, self._runs_dir, [])
            except OSError as exc:  # a directory swapped for a symlink under the walk
                raise Refused(409, f"workspace {accepted.name!r} changed while it was being "
                              f"checked ({exc.strerror}); it is not mounted") from None
            workspace = self._pin(accepted)
        return RunOptions(
            policy=policy, agent=agent, task=task, workspace=workspace,
            model=r.get("model"), engine=self._engine,
            runs_dir=self.run_dir.parent, run_id=self.run_id,
            listeners=[self.meter], host_addresses=self._host_addresses,
            environ=run_environment(self.tenant),
            # The host's pool, shared by all tenants: the run's boundary (its tenant's
            # floor with the run's own tightenings) picks the sandbox it may claim.
            pool=self._pool,
        )

    def _pin(self, accepted: Path) -> Path:
        root = self.tenant.workspaces
        assert root is not None  # recheck_workspace refuses a tenant without one
        try:
            self._pinned = Pinned(root, accepted)
        except Moved:
            raise Refused(409, f"workspace {accepted.name!r} changed since the run was "
                          "accepted (a symlink in its path); it is not mounted") from None
        except OSError as exc:  # no bind mounts (not root): the check is what there is
            log.warning("run %s: the workspace is not pinned (%s); a symlink swapped in "
                        "between the check and the mount would be followed", self.run_id, exc)
            return accepted
        return self._pinned.path

    def _go(self) -> None:
        try:
            run = Run(self._options())
            with self._lock:
                self._run = run
                cancelled = self._cancelled
            if cancelled:
                run.cancel()
            self.result = run.execute()
        except BaseException as exc:  # recorded as the run's end, never lost
            self.error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("run %s did not run: %s", self.run_id, self.error)
            if isinstance(exc, Refused):
                self.error_reason = "workspace_changed"
        finally:
            if self._pinned is not None:
                self._pinned.release()
            self.meter.close()
            with contextlib.suppress(Exception):
                self._on_end(self)

    def outcome(self) -> tuple[str, int | None, str | None, dict[str, float]]:
        """(status, exit code, exit reason, usage) as the store records them."""
        if self.result is None:
            status = "cancelled" if self._cancelled else "failed"
            return (status, None, self.error_reason,
                    self.meter.counters(time.monotonic() - self.started))
        r = self.result
        usage = self.meter.counters(r.duration_s)
        # The budgets are what the gateway and MCP server charged: the authoritative count.
        used = r.totals
        usage["provider_requests"] = max(usage["provider_requests"], used.get("requests", 0))
        usage["tokens"] = max(usage["tokens"], used.get("tokens", 0))
        usage["mcp_calls"] = max(usage["mcp_calls"], used.get("mcp_calls", 0))
        usage["output_bytes"] = used.get("output_bytes", 0)
        return service_status(r), r.exit_code, r.exit_reason, usage
