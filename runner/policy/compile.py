"""A policy compiled to what an engine needs: one `ContainerSpec` for the sandbox.

This is the single place where the policy's words become engine settings, so
`airlock policy compile` can show exactly what a run would ask for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.engines.base import LABEL_MANAGED, LABEL_OWNER, LABEL_RUN, ContainerSpec, Mount
from runner.policy.models import SANDBOX_HOME, WORKSPACE_PATH, Policy

# -S: the shim needs the standard library only; skipping `site` saves a few ms per start.
SHIM_COMMAND = ["python3", "-I", "-S", "/opt/airlock/airlock_sandbox/shim.py"]
RUN_DIR_IN_SANDBOX = "/run/airlock"
# The engine runtime that runs gVisor on its ptrace platform: a second registration of
# runsc, because an engine passes one fixed set of flags per runtime name.
GVISOR_PTRACE_RUNTIME = "runsc-ptrace"


def engine_runtime(policy: Policy) -> str:
    """The engine's runtime name for the policy's boundary (runc, runsc, runsc-ptrace)."""
    if policy.process.runtime == "runsc" and policy.process.gvisor_platform == "ptrace":
        return GVISOR_PTRACE_RUNTIME
    return policy.process.runtime


@dataclass
class SandboxInputs:
    """What the orchestrator prepared on the host for one sandbox."""

    image: str
    run_id: str
    owner: str
    run_dir: Path | None = None  # bound read-only at /run/airlock (sockets, shim.cfg)
    etc_dir: Path | None = None  # holds the sandbox's own resolv.conf and hosts
    workspace: Path | None = None  # the directory to bind at /workspace
    workspace_writable: bool = False
    extra_labels: dict[str, str] = field(default_factory=dict)


def tmpfs_options(policy: Policy) -> dict[str, str]:
    uid, _, gid = policy.process.user.partition(":")
    gid = gid or uid
    out = {}
    for path, size in policy.filesystem.tmpfs.items():
        opts = ["rw", "nosuid", "nodev", f"size={size}"]
        # Docker mounts tmpfs noexec unless told otherwise, so exec must be explicit.
        opts.append("exec" if path in policy.filesystem.exec_tmpfs else "noexec")
        # runc < 1.1.8 ignores mode= over an existing image directory, so ownership is
        # what makes the mount writable for the sandbox user.
        opts += [f"uid={uid}", f"gid={gid}", "mode=1777" if path == "/tmp" else "mode=0700"]
        out[path] = ",".join(opts)
    return out


def seccomp_profile(policy: Policy) -> dict[str, Any]:
    from runner.policy.seccomp import compile_seccomp

    return compile_seccomp(policy.process.seccomp, policy.process.runtime)


def container_spec(policy: Policy, inputs: SandboxInputs) -> ContainerSpec:
    mounts = []
    if inputs.run_dir is not None:
        mounts.append(Mount(str(inputs.run_dir), RUN_DIR_IN_SANDBOX, read_only=True))
    if inputs.etc_dir is not None:
        for name in ("resolv.conf", "hosts"):
            mounts.append(Mount(str(inputs.etc_dir / name), f"/etc/{name}", read_only=True))
    if inputs.workspace is not None:
        mounts.append(Mount(str(inputs.workspace), WORKSPACE_PATH,
                            read_only=not inputs.workspace_writable))
    res = policy.resources
    return ContainerSpec(
        image=inputs.image,
        command=list(SHIM_COMMAND),
        user=policy.process.user,
        env={"HOME": SANDBOX_HOME, "LANG": "C.UTF-8"},
        labels={LABEL_MANAGED: "1", LABEL_RUN: inputs.run_id, LABEL_OWNER: inputs.owner,
                **inputs.extra_labels},
        mounts=mounts,
        tmpfs=tmpfs_options(policy),
        read_only_root=policy.filesystem.read_only_root,
        cap_add=list(policy.process.capabilities),
        no_new_privileges=policy.process.no_new_privileges,
        seccomp_profile=json.dumps(seccomp_profile(policy), separators=(",", ":")),
        runtime=engine_runtime(policy),
        memory=res.memory,
        cpus=res.cpus,
        pids=res.pids,
        nofile=res.nofile,
        # The shim is PID 1 and does an init's work (reaping, forwarding signals); the
        # engine's init would run as the sandbox user, dumpable, open to the agent.
        init=False,
        working_dir=WORKSPACE_PATH if inputs.workspace is not None else SANDBOX_HOME,
        log_max_bytes=max(res.output_bytes + (1 << 20), 1 << 20),
    )
