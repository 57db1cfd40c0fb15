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
# Flags the boundary reads, which take a value.
_VALUED = frozenset({"network", "host-uds", "platform"})
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
        dashes = 2 if arg.startswith("--") else 1 if arg.startswith("-") else 0
        name, eq, value = arg[dashes:].partition("=")
        if not dashes or not name or name[0] in "-=":
            raise UnreadableFlags(f"{arg!r} is not a flag")
        if name in _BOOLEAN:
            if not eq or value in _TRUE:
                value = "true"
            elif value in _FALSE:
                value = "false"
            else:
                raise UnreadableFlags(f"{arg!r}: not a boolean")
        elif not eq:
            # A flag we do not know as a boolean takes the next argument as its value, as
            # Go does for a non-boolean; unless that looks like a flag: then it is read as
            # one, so `--unknown-bool --oci-seccomp=false` cannot hide the second.
            if i < len(items) and not (items[i].startswith("-") and name not in _VALUED):
                value = items[i]
                i += 1
            elif name in _VALUED:
                raise UnreadableFlags(f"{arg!r} has no value")
            else:
                value = "true"
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
