"""Reading a gVisor runtime's registered flags as runsc itself will read them.

runsc parses its flags with Go's `flag` package: `-f` and `--f` are the same flag, a
value comes as `--f=v` or as the next argument, a boolean is set by `--f` alone, and the
last occurrence wins. So `--oci-seccomp ... --oci-seccomp=false` means no seccomp filter:
a check that only looks for `--oci-seccomp` in the list would pass it.
"""

from __future__ import annotations

from collections.abc import Iterable

# Flags of runsc that are booleans (take no separate value); the ones the boundary needs
# and the few others an operator commonly adds.
_BOOLEAN = frozenset({"oci-seccomp", "debug", "strace", "rootless", "ignore-cgroups",
                      "allow-flag-override", "directfs", "cpu-num-from-quota", "profile",
                      "systemd-cgroup", "overlay", "nvproxy", "tpuproxy"})
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class UnreadableFlags(ValueError):
    """runtimeArgs that runsc would not read as flags (a stray value)."""


def effective_flags(args: Iterable[str]) -> dict[str, str]:
    """Flag name -> the value runsc ends up with (booleans as "true"/"false")."""
    out: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UnreadableFlags(f"{arg!r} is not a flag")
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOLEAN:
            if not eq or value in _TRUE:
                value = "true"
            elif value in _FALSE:
                value = "false"
            else:
                raise UnreadableFlags(f"{arg!r}: not a boolean")
        elif not eq:
            if i >= len(items):
                raise UnreadableFlags(f"{arg!r} has no value")
            value = items[i]
            i += 1
        out[name] = value
    return out


def missing_for_boundary(runtime: str, args: Iterable[str]) -> list[str]:
    """The flags a registered gVisor runtime must get (or get back) for Airlock's boundary.

    Without --oci-seccomp gVisor ignores the seccomp profile; without --network=none the
    sandbox gets gVisor's own network stack; without --host-uds the run's sockets cannot
    be reached; a runtime named *-ptrace must select that platform.
    """
    try:
        flags = effective_flags(args)
    except UnreadableFlags as exc:
        return [f"readable flags ({exc})"]
    missing = []
    if flags.get("network") != "none":
        missing.append("--network=none")
    if flags.get("oci-seccomp") != "true":
        missing.append("--oci-seccomp")
    if flags.get("host-uds") not in ("open", "all"):
        missing.append("--host-uds=open")
    if runtime.endswith("-ptrace") and flags.get("platform") != "ptrace":
        missing.append("--platform=ptrace")
    return missing
