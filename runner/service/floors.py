"""A run's policy on top of its tenant's floor, and the workspace a tenant may name.

The floor is the least strict any of the tenant's runs may be. The run's policy (a
mapping, or YAML text read by the policy loader's bounded YAML) is merged onto the
floor as `extends:` would merge it, validated, and compared with the floor by
`runner.policy.floor.widenings_over`: anything wider is refused, naming every key.

On top of that comparison, the service binds the provider: a floor that names no
provider lets no run name one. The provider gateway runs on the host, with the
tenant's real key; a run that chose its endpoint could point it, key and all, at a
server of the tenant's choosing or at the host's own network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from runner.policy.floor import Widening, widenings_over
from runner.policy.loader import MAX_POLICY_BYTES, merge_onto, parse_yaml
from runner.policy.models import Policy
from runner.service.config import TenantConfig


class Refused(Exception):
    """The request cannot become a run; `status` is the HTTP answer (400, 403, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _one_line(text: str, limit: int = 2000) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _document(policy: dict[str, Any] | str) -> dict[str, Any]:
    if isinstance(policy, str):
        if len(policy.encode("utf-8", errors="replace")) > MAX_POLICY_BYTES:
            raise Refused(413, f"policy: larger than {MAX_POLICY_BYTES >> 10} KiB")
        try:
            data, _, problems = parse_yaml(policy, "policy")
        except (RecursionError, MemoryError):  # nesting or aliases beyond any policy's
            raise Refused(400, "policy: the YAML nests too deeply or expands too far") from None
        if problems:
            raise Refused(400, _one_line("; ".join(problems)))
        if data is None:
            return {}
        policy = data
    if not isinstance(policy, dict):
        raise Refused(400, "policy: must be a mapping of policy sections (an object or YAML text)")
    if "extends" in policy:
        raise Refused(400, "policy.extends: a run's policy is applied on top of the tenant's "
                      "floor and cannot extend anything else")
    return policy


def _floor_document(floor: Policy) -> dict[str, Any]:
    data = floor.model_dump(mode="json", exclude={"extends"})
    return data


def provider_widenings(floor: Policy, candidate: Policy) -> list[Widening]:
    if floor.provider is None and candidate.provider is not None:
        return [Widening("provider", None, candidate.provider.backend,
                         "the tenant's floor names no provider, so no run may name one")]
    return []


def platform_widenings(floor: Policy, candidate: Policy) -> list[Widening]:
    # The platform is the operator's choice for the host, not the tenant's: systrap's idle
    # sandboxes each hold ~2.5 % of a core, and on an overcommitted dense host one tenant's
    # idle runs would slow everyone's; ptrace the other way round slows system calls.
    if (candidate.process.runtime == "runsc"
            and candidate.process.gvisor_platform != floor.process.gvisor_platform):
        return [Widening("process.gvisor_platform", floor.process.gvisor_platform,
                         candidate.process.gvisor_platform,
                         "the service runs gVisor on its floor's platform")]
    return []


def apply_on_floor(tenant: TenantConfig, policy: dict[str, Any] | str | None) -> Policy:
    """The run's effective policy, or Refused (400 unreadable, 422 invalid, 403 wider)."""
    if policy is None:
        return tenant.floor
    doc = _document(policy)
    merged = merge_onto(_floor_document(tenant.floor), doc)
    try:
        candidate = Policy.model_validate(merged)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msgs.append(f"policy.{where}: unknown key")
            else:
                msgs.append(f"policy.{where}: {str(err['msg']).removeprefix('Value error, ')}")
        raise Refused(422, _one_line("; ".join(msgs))) from None
    wider = (provider_widenings(tenant.floor, candidate) or widenings_over(tenant.floor, candidate)
             or platform_widenings(tenant.floor, candidate))
    if wider:
        raise Refused(403, _one_line(
            f"the policy widens tenant {tenant.name}'s floor ({tenant.floor_ref}): "
            + "; ".join(str(w) for w in wider)))
    return candidate


def _resolved(path: Path, named: str) -> Path:
    """realpath, where a path changing under the walk is a refusal, not a crash.

    A directory swapped for a symlink while realpath reads it makes readlink fail with
    EINVAL (measured: the racing test's own `rw` run got the service to answer 500).
    """
    try:
        return Path(os.path.realpath(path))
    except OSError as exc:
        raise Refused(409, f"workspace {named!r} changed while it was being resolved "
                      f"({exc.strerror}); it is not mounted") from None


def resolve_workspace(tenant: TenantConfig, value: str | None) -> Path | None:
    """The real directory a run may mount: under the tenant's root, symlinks resolved."""
    if value is None:
        return None
    root = tenant.workspaces
    if root is None:
        raise Refused(403, f"workspace: tenant {tenant.name} has no workspaces root, so its "
                      "runs cannot name a workspace")
    if "\x00" in value or not value.strip():
        raise Refused(400, "workspace: not a path")
    path = Path(value)
    if not path.is_absolute():
        path = root / path
    # Resolved before the containment check (a symlink under the root that points out
    # is outside), and the check comes before any question about existence, so a refusal
    # tells nothing about the host's files outside the root.
    real = _resolved(path, value)
    if real != root and root not in real.parents:
        raise Refused(403, f"workspace: {value!r} is outside tenant {tenant.name}'s workspaces")
    if not real.exists():
        raise Refused(400, f"workspace: {value!r} does not exist")
    if not real.is_dir():
        raise Refused(400, f"workspace: {value!r} is not a directory")
    return real


def recheck_workspace(tenant: TenantConfig, accepted: Path) -> Path:
    """At the run's start: the directory accepted when the run was queued, still itself.

    A run waits in the queue with the real path its workspace had then. Whoever can
    write under the tenant's root (the tenant, or its own `rw` run going on meanwhile)
    could put a symlink in place of that directory or of any directory above it, and
    the mount would follow it out: measured, a queued run read another tenant's
    workspace this way. A path that no longer resolves to itself, or resolves outside
    the root, is not mounted. (What is left is the moment between this check and the
    engine's mount; see docs/security.md.)
    """
    root = tenant.workspaces
    real = _resolved(accepted, accepted.name)
    if root is None or real != accepted or (real != root and root not in real.parents) \
            or not real.is_dir():
        raise Refused(409, f"workspace {accepted.name!r} changed since the run was accepted "
                      "(a symlink in its path, or it is gone); it is not mounted")
    return real
