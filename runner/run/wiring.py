"""Which host services a run gets, from its policy, and how the sandbox reaches them.

Each service listens on a unix socket in the run's directory; the shim bridges a fixed
loopback port inside the sandbox to it, and the agent finds the URL in its environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.run.services import ServiceHost

if TYPE_CHECKING:
    from runner.run.orchestrator import Run

SANDBOX_SOCKETS = "/run/airlock"


def _bridge(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "port": port, "socket": f"{SANDBOX_SOCKETS}/{name}.sock"}


def start_services(run: Run, host: ServiceHost, run_dir: Path
                   ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from runner.run.orchestrator import BRIDGE_PORTS

    policy = run.policy
    bridges: list[dict[str, Any]] = []
    env: dict[str, str] = {}
    if policy.network.mode == "none":
        return bridges, env
    return bridges, env
