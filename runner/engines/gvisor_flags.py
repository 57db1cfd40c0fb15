"""Reading a gVisor runtime's registered flags as runsc itself will read them.

runsc parses its flags with Go's `flag` package: `-f` and `--f` are the same flag, a
boolean is set by `--f` alone, a value comes as `--f=v` or as the next argument, and the
last occurrence wins. So `--oci-seccomp ... --oci-seccomp=false` means no seccomp filter:
a check that only looks for `--oci-seccomp` in the list would pass it. And dockerd hands
runtimeArgs to runsc through a `/bin/sh` wrapper that joins them with spaces, so one
element `"--debug --network=host"` is two flags by the time runsc reads it.

To read them without knowing every flag of every runsc release, a registration is read
only when each element is one self-contained flag of plain characters: `--name=value`,
or `--name` alone for a known boolean. Anything else (a value in the next element, an
unknown bare flag, a space or shell character) is refused as unreadable, with the form to
write instead; the forms `make engine` and gVisor's own docs use all pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# runsc's boolean flags (`runsc flags`, release 2024-07-29, and Go's own help flags):
# the only ones that may stand alone.
_BOOLEAN = frozenset({
    "EXPERIMENTAL-xdp-need-wakeup", "TESTONLY-afs-syscall-panic",
    "TESTONLY-allow-packet-endpoint-write", "TESTONLY-autosave-resume",
    "TESTONLY-unsafe-nonroot", "allow-flag-override", "alsologtostderr", "app-huge-pages",
    "buffer-pooling", "cgroupfs", "cpu-num-from-quota", "debug", "debug-to-user-log",
    "directfs", "enable-core-tags", "fsgofer-host-uds", "fuse", "gso", "gvisor-gro",
    "ignore-cgroups", "iouring", "lisafs", "log-packets", "net-disconnect-ok", "net-raw",
    "nvproxy", "nvproxy-docker", "oci-seccomp", "overlay", "profile", "reproduce-nat",
    "reproduce-nftables", "rootless", "rx-checksum-offload", "software-gso", "strace",
    "strace-event", "systemd-cgroup", "tpuproxy", "tx-checksum-offload", "version", "vfs2",
    "help", "h",
})
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# What passes the shell wrapper unchanged: no space, quote, `$`, backquote, `;`, `#`, glob.
_PLAIN = re.compile(r"[A-Za-z0-9_./:=,@%+-]+")
# Flags that let something other than the registration set the boundary's flags
# (per-container annotations) or drop its checks; each must end up false.
_MUST_BE_OFF = ("allow-flag-override", "TESTONLY-unsafe-nonroot")


def boundary_flags(runtime: str) -> str:
    """The runtimeArgs to register a gVisor runtime with for Airlock's boundary."""
    flags = "--network=none --host-uds=open --oci-seccomp"
    return f"{flags} --platform=ptrace" if runtime.endswith("-ptrace") else flags


class UnreadableFlags(ValueError):
    """runtimeArgs that cannot be read for sure as runsc will read them."""


def effective_flags(args: Iterable[str]) -> dict[str, str]:
    """Flag name -> the value runsc ends up with (booleans as "true"/"false")."""
    out: dict[str, str] = {}
    for arg in args:
        if not _PLAIN.fullmatch(arg):
            raise UnreadableFlags(f"{arg!r} has a space or a shell character (dockerd "
                                  "passes runtimeArgs through /bin/sh)")
        dashes = 2 if arg.startswith("--") else 1 if arg.startswith("-") else 0
        name, eq, value = arg[dashes:].partition("=")
        if not dashes or not name or name[0] in "-=":
            raise UnreadableFlags(f"{arg!r} is not a flag (write a value as --name=value)")
        if name in _BOOLEAN:
            if not eq or value in _TRUE:
                value = "true"
            elif value in _FALSE:
                value = "false"
            else:
                raise UnreadableFlags(f"{arg!r}: not a boolean")
        elif not eq:
            raise UnreadableFlags(f"{arg!r}: write it as {arg}=VALUE (a value in the next "
                                  "element cannot be read for sure)")
        out[name] = value
    return out


def missing_for_boundary(runtime: str, args: Iterable[str]) -> list[str]:
    """The flags a registered gVisor runtime must get (or get back, appended: the last
    value wins) for Airlock's boundary. UnreadableFlags when that cannot be told.

    Without --oci-seccomp gVisor ignores the seccomp profile; without --network=none the
    sandbox gets gVisor's own network stack; without --host-uds the run's sockets cannot
    be reached; a runtime named *-ptrace must select that platform; flag overrides by
    annotation would let a container's spec undo all of it.
    """
    flags = effective_flags(args)
    missing = []
    if flags.get("network") != "none":
        missing.append("--network=none")
    if flags.get("oci-seccomp") != "true":
        missing.append("--oci-seccomp")
    if flags.get("host-uds") not in ("open", "all"):
        missing.append("--host-uds=open")
    if runtime.endswith("-ptrace") and flags.get("platform") != "ptrace":
        missing.append("--platform=ptrace")
    missing += [f"--{name}=false" for name in _MUST_BE_OFF if flags.get(name) == "true"]
    return missing


def registration_problem(runtime: str, args: Iterable[str]) -> tuple[str, str] | None:
    """None for a registration that holds the boundary; else (what is wrong, the fix),
    each a phrase for a one-line message."""
    try:
        missing = missing_for_boundary(runtime, args)
    except UnreadableFlags as exc:
        return (f"its runtimeArgs cannot be read for sure: {exc}",
                f"write each of the {runtime} runtimeArgs as one --name=value element in "
                "the engine's daemon.json and reload the engine")
    if not missing:
        return None
    flags = " ".join(missing)
    return (f"it is registered without {flags}",
            f"add {flags} at the end of the {runtime} runtimeArgs in the engine's "
            "daemon.json and reload the engine")
