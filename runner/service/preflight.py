"""What the service checks of its engine before it listens.

A tenant's floor fixes the runtime its runs need at the least (a run may narrow runc to
runsc, never widen), and the floor binds gVisor's platform; a fixed pool entry names its
own. If the engine has no such runtime, every run of that tenant would be refused one at
a time by its readiness check; the operator learns it at start instead, with the fix.
"""

from __future__ import annotations

from collections.abc import Iterable

from runner.errors import NotReady
from runner.policy.compile import GVISOR_PTRACE_RUNTIME, engine_runtime
from runner.service.config import Config


def needed_runtimes(config: Config) -> dict[str, list[str]]:
    """Engine runtime -> who in the config needs it (tenants and fixed pool entries)."""
    needed: dict[str, list[str]] = {}
    for tenant in config.tenants.values():
        needed.setdefault(engine_runtime(tenant.floor), []).append(f"tenant {tenant.name}")
    for entry in config.pools.fixed if config.pools is not None else ():
        needed.setdefault(engine_runtime(entry.policy), []).append(
            f"pools.fixed {entry.policy_ref} ({entry.agent})")
    return needed


def check_runtimes(config: Config, registered: Iterable[str]) -> None:
    """NotReady (exit 3) naming each runtime the config needs and the engine lacks."""
    have = set(registered)
    missing = {rt: who for rt, who in needed_runtimes(config).items() if rt not in have}
    if not missing:
        return
    lines = "; ".join(f"{rt} (needed by {', '.join(who)})" for rt, who in sorted(missing.items()))
    hints = []
    if GVISOR_PTRACE_RUNTIME in missing:
        hints.append(f"register runsc a second time as {GVISOR_PTRACE_RUNTIME} with "
                     "--platform=ptrace added to its runtimeArgs")
    if "runsc" in missing:
        hints.append("install gVisor and register runsc with --network=none "
                     "--host-uds=open --oci-seccomp")
    hints.append("in a checkout `make engine` does this; `airlock doctor` checks it")
    raise NotReady(f"{config.path}: the engine has no runtime {lines}",
                   hint="; ".join(hints))
