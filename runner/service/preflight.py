"""What the service checks of its engine before it listens.

A tenant's floor fixes the runtime its runs need at the least (a run may narrow runc to
runsc, never widen), and the floor binds gVisor's platform; a fixed pool entry names its
own. If the engine has no such runtime, or registered gVisor without the flags the
boundary needs, every run of that tenant would be refused one at a time by its readiness
check; the operator learns it at start instead, with the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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


def check_runtimes(config: Config, registered: Iterable[str],
                   missing_args: Callable[[str], list[str]]) -> None:
    """NotReady (exit 3) naming each runtime the config needs that the engine lacks or
    registered without the flags the boundary needs (`missing_args(runtime)`)."""
    have = set(registered)
    absent: list[str] = []
    weak: list[str] = []
    hints: list[str] = []
    for rt, who in sorted(needed_runtimes(config).items()):
        needers = ", ".join(who)
        if rt not in have:
            absent.append(f"{rt} (needed by {needers})")
            if rt == GVISOR_PTRACE_RUNTIME:
                hints.append(f"register runsc a second time as {rt} with --network=none "
                             "--host-uds=open --oci-seccomp --platform=ptrace")
            elif rt == "runsc":
                hints.append("install gVisor and register runsc with --network=none "
                             "--host-uds=open --oci-seccomp")
        elif rt != "runc" and (lacking := missing_args(rt)):
            weak.append(f"{rt} is registered without {' '.join(lacking)} (needed by {needers})")
            hints.append(f"add {' '.join(lacking)} to the {rt} runtimeArgs and restart the engine")
    if not absent and not weak:
        return
    problems = ([f"the engine has no runtime {'; '.join(absent)}"] if absent else []) + weak
    hints.append("in a checkout `make engine` does this; `airlock doctor` checks it")
    raise NotReady(f"{config.path}: {'; '.join(problems)}", hint="; ".join(hints))
