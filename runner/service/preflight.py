"""What the service checks of its engine before it listens.

A tenant's floor fixes the runtime its runs need (a run may narrow runc to runsc on the
floor's gVisor platform, never widen), and a fixed pool entry names its own. If the
engine lacks one, every run of that tenant would be refused one at a time; the operator
learns it at start instead, with the fix. A gVisor runtime registered without the flags
the boundary needs is refused at start whoever may reach it (the engine refuses each
sandbox on it too); one that only a narrowing run could choose may be absent: a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from runner.engines.gvisor_flags import boundary_flags
from runner.errors import NotReady
from runner.policy.compile import GVISOR_PTRACE_RUNTIME, engine_runtime
from runner.service.config import Config

_REGISTER = {
    "runsc": f"install gVisor and register it as runsc with {boundary_flags('runsc')}",
    GVISOR_PTRACE_RUNTIME: f"register runsc a second time as {GVISOR_PTRACE_RUNTIME} with "
                           f"{boundary_flags(GVISOR_PTRACE_RUNTIME)}",
    "runc": "the engine's default runtime is gone: reinstall or repair the engine",
}


def needed_runtimes(config: Config) -> dict[str, list[str]]:
    """Engine runtime -> who in the config needs it (tenants and fixed pool entries)."""
    needed: dict[str, list[str]] = {}
    for tenant in config.tenants.values():
        needed.setdefault(engine_runtime(tenant.floor), []).append(f"tenant {tenant.name}")
    for entry in config.pools.fixed if config.pools is not None else ():
        needed.setdefault(engine_runtime(entry.policy), []).append(
            f"pools.fixed {entry.policy_ref} ({entry.agent})")
    return needed


def narrowing_runtimes(config: Config) -> dict[str, list[str]]:
    """Engine runtime -> tenants whose runs may choose it by narrowing runc to gVisor."""
    out: dict[str, list[str]] = {}
    for tenant in config.tenants.values():
        if tenant.floor.process.runtime == "runc":
            floor = tenant.floor.model_copy(deep=True)
            floor.process.runtime = "runsc"
            out.setdefault(engine_runtime(floor), []).append(f"tenant {tenant.name}")
    return out


def check_runtimes(config: Config, registered: Iterable[str],
                   problem_of: Callable[[str], tuple[str, str] | None]) -> list[str]:
    """Warnings to log; NotReady (exit 3) for each runtime the config needs that the
    engine lacks, and each reachable gVisor runtime whose registration does not hold the
    boundary (`problem_of(runtime)`: what is wrong and its fix, or None)."""
    have = set(registered)
    needed = needed_runtimes(config)
    narrowing = narrowing_runtimes(config)
    problems: list[str] = []
    hints: list[str] = []
    warnings: list[str] = []
    for rt in sorted(set(needed) | set(narrowing)):
        who = ", ".join(needed.get(rt) or narrowing[rt])
        if rt not in have:
            if rt in needed:
                problems.append(f"the engine has no runtime {rt} (needed by {who})")
                hints.append(_REGISTER.get(rt, f"register {rt} with the engine"))
            else:
                warnings.append(f"the engine has no runtime {rt}: runs of {who} that "
                                f"choose it will be refused ({_REGISTER.get(rt, '')})")
        elif rt != "runc" and (problem := problem_of(rt)) is not None:
            problems.append(f"the engine's runtime {rt}: {problem[0]} (reached by {who})")
            hints.append(problem[1])
    if problems:
        hints.append("`airlock doctor` checks the engine; in a checkout `make engine` "
                     "registers runsc and runsc-ptrace")
        raise NotReady(f"{config.path}: {'; '.join(problems)}", hint="; ".join(hints))
    return warnings
