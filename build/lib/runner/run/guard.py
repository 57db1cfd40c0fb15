"""Inputs a run refuses before it makes anything: a workspace that would expose the host,
a model the run cannot use.

A workspace is bind-mounted at /workspace (read-only at least), so `--workspace /` would
show the agent the host's /proc (every command line), the engine's socket (the host
itself) and every other run's record. Such directories are refused (exit 2) unless the
policy says `filesystem.allow_sensitive_workspace: true`, which is a recorded widening.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runner.errors import BadInput
from runner.policy.models import Policy

# The host's own trees: the directory and everything below it.
HOST_TREES = {
    "/proc": "the host's processes (/proc)",
    "/sys": "the host's kernel interfaces (/sys)",
    "/dev": "the host's devices (/dev)",
    "/etc": "the host's configuration (/etc)",
    "/boot": "the host's boot files (/boot)",
    "/run": "the host's runtime state and sockets (/run)",
    "/var/run": "the host's runtime state and sockets (/var/run)",
}


def engine_sockets() -> list[str]:
    """The engine's unix socket(s): DOCKER_HOST's, else the default one."""
    host = os.environ.get("DOCKER_HOST", "")
    out = ["/var/run/docker.sock", "/run/docker.sock"]
    if host.startswith("unix://"):
        out.insert(0, host.removeprefix("unix://"))
    return out


def _forms(path: str) -> set[str]:
    """The path as written (absolute, normalised) and with every symlink resolved."""
    return {os.path.normpath(os.path.abspath(path)), os.path.realpath(path)}


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def sensitive_reason(workspace: Path, runs_dir: Path, sockets: list[str]) -> str | None:
    """Why mounting `workspace` would expose the host, or None."""
    forms = _forms(str(workspace))
    if "/" in forms:
        return "it is the host's root directory"
    for tree, what in HOST_TREES.items():
        for tree_form in _forms(tree):
            if any(_within(f, tree_form) for f in forms):
                return f"it is {what}"
    for runs_form in _forms(str(runs_dir)):
        if any(_within(f, runs_form) for f in forms):
            return f"it is Airlock's runs directory ({runs_dir}: every run's record)"
    for sock in sockets:
        for sock_form in _forms(sock):
            if any(_within(sock_form, f) for f in forms):
                return (f"it contains {sock}, a socket that controls the host "
                        "(the engine's or Airlock's)")
    tmp = tempfile.gettempdir()
    for tmp_form in _forms(tmp):
        if any(_within(tmp_form, f) for f in forms):
            return f"it contains {tmp}, where runs keep their sockets"
    return None


def check_workspace(workspace: Path | None, policy: Policy, runs_dir: Path,
                    sockets: list[str]) -> str | None:
    """Refuse (BadInput) a workspace that exposes the host, unless the policy allows it;
    return the reason when it is allowed (the run records it), else None."""
    if workspace is None:
        return None
    reason = sensitive_reason(workspace, runs_dir, [*engine_sockets(), *sockets])
    try:
        is_dir = workspace.is_dir()
    except OSError as exc:
        raise BadInput(f"--workspace {workspace}: {exc.strerror}") from None
    if not is_dir:
        raise BadInput(f"--workspace {workspace} is not a directory")
    if reason is None:
        return None
    if policy.filesystem.allow_sensitive_workspace:
        return reason
    raise BadInput(f"workspace {workspace} is refused: {reason}",
                   hint="name a project directory; only a policy with "
                   "filesystem.allow_sensitive_workspace: true may mount this")


def check_model(policy: Policy, model: str | None) -> None:
    """`--model` needs a provider the model belongs to."""
    if model is None:
        return
    if policy.provider is None:
        raise BadInput(f"--model {model}: the policy has no provider section, so no model "
                       "can be reached", hint="add --provider BACKEND or a provider: section "
                       "to the policy")
    if policy.provider.resolve_model(model) is None:
        allowed = ", ".join(sorted({*policy.provider.models, *policy.provider.allowed_models()}))
        raise BadInput(f"--model {model} is not allowed by the policy "
                       f"(allowed: {allowed or 'none configured'})",
                       hint="name one of these, or add it to provider.models")
