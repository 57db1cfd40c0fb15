"""Compile a policy's `process.seccomp` section to a Docker seccomp profile.

The result is a dict in the format dockerd 20.10 parses; pass it as
`security_opt=["seccomp=" + json.dumps(profile)]` (the Engine API wants the JSON text, not a
path). Shape, and why:

- `defaultAction` denies (EPERM, or a kill): an allowlist, never a denylist.
- `architectures` holds only the native arch. Docker's `archMap` would add the compat
  arches (i386, x32) and with them `socketcall`, which bypasses every socket() rule; with
  one arch the kernel kills any compat call outright.
- One unconditional ALLOW rule for the groups + `allow`, minus `deny` and the `never` set.
- Conditional rules, each an EQ or MASKED_EQ on one argument, one value per rule: runc and
  gVisor OR several conditions on the same argument, and range or NE conditions on an
  int argument are bypassed by setting bits above 32 that the kernel truncates away.
- runc only: an ERRNO/ENOSYS rule for new calls that libc probes and falls back from
  (clone3 above all), so glibc takes its old path instead of failing.
- One explicit rule listing the `never` set and the policy's denials with the default
  action, so a reader of the profile sees them (runc drops rules that repeat the default
  action, so this costs nothing at run time).

Runtime differences (measured on Docker 20.10.24, runc 1.1.5, runsc 20221219):
- "kill" must end the whole process. runc maps SCMP_ACT_KILL to kill-thread, so it gets
  SCMP_ACT_KILL_PROCESS. runsc refuses KILL_PROCESS ("invalid action"), and its
  SCMP_ACT_KILL is kill-thread too: a denied call in a worker thread left the process
  running (exit 0, or hung joining the dead thread). So runsc gets SCMP_ACT_TRAP: the call
  never runs, and the unhandled SIGSYS ends the whole thread group (exit 159, measured on
  every run). A program that installs its own SIGSYS handler survives the trap, but the
  call still does not execute, which is all ERRNO would have given it.
- runsc ignores `errnoRet`: every ERRNO is EPERM, and glibc's pthread_create fails on an
  EPERM from clone3. So clone3 is allowed and the Sentry answers it: runsc 20221219 has no
  clone3 and says ENOSYS (glibc falls back to clone); a newer Sentry that implements it
  keeps any namespace it creates inside the sandbox.
- runc prepends a stub that answers ENOSYS for every syscall numbered above the highest
  one the profile names. futex_waitv (449) is always named, allowed or in the ENOSYS rule,
  so the stub answers only set_mempolicy_home_node (450) and calls newer than the 6.1
  tables (fchmodat2 and later), which is what libc wants from a kernel without them.
"""

from __future__ import annotations

import platform
from typing import Any, Literal

from runner.policy.models import SeccompPolicy
from runner.policy.syscalls import (
    ENOSYS_WHEN_DENIED,
    GROUP_FAMILIES,
    GROUPS,
    NEVER,
    SOCKET_FAMILIES,
    TABLES,
    check_allowable_syscall,
    check_group_name,
    check_syscall_name,
)

Runtime = Literal["runc", "runsc"]

ENOSYS = 38
AF_UNIX = 1
# CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET, the mask Docker's profile uses.
CLONE_NAMESPACE_FLAGS = 0x7E020000
# PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the 0xffffffff query; anything
# else (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC) weakens exploit mitigations.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Calls that never get a plain ALLOW: they are compiled to argument rules or per runtime.
_CONDITIONAL = frozenset({"clone", "clone3", "personality", "socket", "socketpair", "mknod",
                          "mknodat"})
# mknod may make FIFOs and regular files (file type 0 means regular), never device nodes:
# without CAP_MKNOD the kernel refuses devices under runc, but gVisor let uid 1000 make
# and open /dev/null-, tun- and fuse-like nodes on a tmpfs (found by the conformance suite).
S_IFMT = 0o170000
MKNOD_TYPES = (0, 0o010000, 0o100000)  # unspecified (regular), S_IFIFO, S_IFREG
MKNOD_MODE_ARG = {"mknod": 1, "mknodat": 2}

_ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_SCMP_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}

ALLOW = "SCMP_ACT_ALLOW"
ERRNO = "SCMP_ACT_ERRNO"


def native_arch(arch: str | None = None) -> str:
    """`x86_64` or `aarch64` for an arch name in kernel or Go spelling (default: this host)."""
    name = (arch or platform.machine()).lower()
    if name not in _ARCH_ALIASES:
        raise ValueError(f"no seccomp syscall table for architecture {name!r} (x86_64, aarch64)")
    return _ARCH_ALIASES[name]


def unknown_syscalls(policy: SeccompPolicy) -> list[str]:
    """Every problem with the names in the policy, one message each; empty when all is well.

    The model validates these already; this re-checks for policies built without validation
    (`model_construct`), because a typo in `deny` would otherwise leave the call allowed.
    """
    problems = []
    for field, names, check in (
        ("groups", policy.groups, check_group_name),
        ("allow", policy.allow, check_allowable_syscall),
        ("deny", policy.deny, check_syscall_name),
    ):
        for name in names:
            try:
                check(name)
            except ValueError as exc:
                problems.append(f"process.seccomp.{field}: {exc}")
    for family in policy.socket_families:
        if family not in SOCKET_FAMILIES:
            problems.append(f"process.seccomp.socket_families: unknown family {family!r}")
    return problems


def allowed_syscalls(policy: SeccompPolicy, arch: str | None = None) -> set[str]:
    """The names the policy lets through on `arch`, conditional ones included."""
    table = TABLES[native_arch(arch)]
    wanted: set[str] = set(policy.allow)
    for group in policy.groups:
        wanted |= GROUPS[group]
    return (wanted - set(policy.deny) - NEVER) & table.keys()


def socket_families(policy: SeccompPolicy) -> list[int]:
    """AF_* values socket() may create: what the groups grant, narrowed by socket_families."""
    granted: set[str] = set()
    for group in policy.groups:
        granted |= GROUP_FAMILIES.get(group, frozenset())
    if "socket" in policy.allow:
        granted |= set(SOCKET_FAMILIES)
    return sorted(SOCKET_FAMILIES[f] for f in set(policy.socket_families) & granted)


def _default_action(policy: SeccompPolicy, runtime: Runtime) -> str:
    if policy.default_action == "errno":
        return ERRNO
    return "SCMP_ACT_KILL_PROCESS" if runtime == "runc" else "SCMP_ACT_TRAP"


def _arg_rule(name: str, index: int, value: int, op: str, value_two: int | None = None) -> dict:
    arg: dict[str, Any] = {"index": index, "value": value, "op": op}
    if value_two is not None:
        arg["valueTwo"] = value_two
    return {"names": [name], "action": ALLOW, "args": [arg]}


def compile_seccomp(
    policy: SeccompPolicy, runtime: Runtime, arch: str | None = None
) -> dict[str, Any]:
    """The Docker seccomp profile for `policy` under `runtime` on `arch` (default: this host).

    Raises ValueError for unknown syscall or group names, a `never` call in `allow`, or an
    unknown runtime or arch.
    """
    if runtime not in ("runc", "runsc"):
        raise ValueError(f"unknown runtime {runtime!r} (runc, runsc)")
    problems = unknown_syscalls(policy)
    if problems:
        raise ValueError("; ".join(problems))
    arch = native_arch(arch)
    table = TABLES[arch]
    default = _default_action(policy, runtime)

    allowed = allowed_syscalls(policy, arch)
    plain = allowed - _CONDITIONAL
    if runtime == "runsc" and "clone3" in allowed:
        plain.add("clone3")
    rules: list[dict[str, Any]] = []
    if plain:
        rules.append({"names": sorted(plain), "action": ALLOW})
    if "clone" in allowed:
        rules.append(
            _arg_rule("clone", 0, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", value_two=0)
        )
    if "personality" in allowed:
        rules.extend(_arg_rule("personality", 0, p, "SCMP_CMP_EQ") for p in PERSONALITIES)
    if "socket" in allowed:
        rules.extend(_arg_rule("socket", 0, f, "SCMP_CMP_EQ") for f in socket_families(policy))
    if "socketpair" in allowed:
        rules.append(_arg_rule("socketpair", 0, AF_UNIX, "SCMP_CMP_EQ"))
    for name, index in MKNOD_MODE_ARG.items():
        if name in allowed:
            rules.extend(_arg_rule(name, index, S_IFMT, "SCMP_CMP_MASKED_EQ", value_two=t)
                         for t in MKNOD_TYPES)

    enosys: set[str] = set()
    if runtime == "runc":
        enosys = set(ENOSYS_WHEN_DENIED & table.keys()) - plain
        if enosys:
            rules.append({"names": sorted(enosys), "action": ERRNO, "errnoRet": ENOSYS})
    denied = ((NEVER | set(policy.deny)) & table.keys()) - enosys
    if denied:
        rules.append({"names": sorted(denied), "action": default})

    profile = {"defaultAction": default, "architectures": [_SCMP_ARCH[arch]], "syscalls": rules}
    _check(profile, table)
    return profile


def _check(profile: dict[str, Any], table: dict[str, int]) -> None:
    """Invariants no policy may break; a failure here is a compiler bug, so fail closed."""
    if not profile.get("defaultAction") or profile["defaultAction"] == ALLOW:
        raise RuntimeError("a seccomp profile must deny by default")
    allowed = {n for r in profile["syscalls"] if r["action"] == ALLOW for n in r["names"]}
    denied = {n for r in profile["syscalls"] if r["action"] != ALLOW for n in r["names"]}
    if allowed & (NEVER | denied):
        raise RuntimeError(f"allowed and denied at once: {sorted(allowed & (NEVER | denied))}")
    if not (allowed | denied) <= table.keys():
        raise RuntimeError(f"not in the table: {sorted((allowed | denied) - table.keys())}")
    for rule in profile["syscalls"]:
        if not rule["names"]:
            raise RuntimeError("a rule without names")
        args = rule.get("args", [])
        if len(args) > 1 or any(a["op"] not in ("SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ") for a in args):
            raise RuntimeError(f"{rule['names']}: only one EQ or MASKED_EQ condition per rule")
