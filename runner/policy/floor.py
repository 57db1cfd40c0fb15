"""Where one policy is wider than another: tenant floors and preset ceilings.

`widenings_over(floor, candidate)` compares two resolved policies and returns every place
where the candidate opens the boundary beyond the floor, as a structured item naming the
dotted key and both values. The multi-tenant service refuses a run whose policy widens
its tenant's floor; `airlock run` and `policy check` record what a policy raises above
the preset it extends.

The comparison is exhaustive by construction: every leaf field of the policy models has
an entry in `RULES`, and a field without one is compared by equality (any difference is a
widening) and makes `tests/test_policy_floor.py` fail until someone decides its rule.

A floor with no `provider` section leaves the provider open (the presets name none, and a
run names its own); a floor that names one binds the candidate to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from runner.policy.models import Policy


@dataclass(frozen=True)
class Widening:
    """One place where the candidate is wider than the floor.

    `key` is the dotted policy key (`resources.memory`, `network.allow`,
    `filesystem.tmpfs./tmp`); `floor` and `candidate` are the values as a policy writes
    them ("512m", "runsc", a list), None where that side has none.
    """

    key: str
    floor: Any
    candidate: Any
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.candidate)}, wider than {_show(self.floor)} ({self.why})"

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "floor": self.floor, "candidate": self.candidate, "why": self.why}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# A rule gets (key, floor value, candidate value, floor's model value, candidate's) where
# the first two are JSON forms (what a policy writes) and the last two the parsed values
# (bytes, seconds) that compare; it yields the widenings at that key.
Rule = Callable[[str, Any, Any, Any, Any], Iterator[Widening]]


def _order(*narrow_to_wide: str) -> Rule:
    rank = {v: i for i, v in enumerate(narrow_to_wide)}

    def rule(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
        if rank[c] > rank[f]:
            yield Widening(key, fj, cj, "narrow to wide: " + " < ".join(narrow_to_wide))
    return rule


def _more(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    if c > f:
        yield Widening(key, fj, cj, "more")


def _budget(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    # None is no budget: unlimited, the widest there is.
    if f is not None and (c is None or c > f):
        yield Widening(key, fj, cj, "no budget is unlimited" if c is None else "more")


def _must_stay_true(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    if f and not c:
        yield Widening(key, fj, cj, "was true")


def _must_stay_false(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    if c and not f:
        yield Widening(key, fj, cj, "was false")


def _subset(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    have = set(fj)
    for item in cj:
        if item not in have:
            yield Widening(key, fj, item, "not in the list")


def _superset(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    # A deny list: dropping an entry the floor denies allows it again.
    have = set(cj)
    for item in fj:
        if item not in have:
            yield Widening(key, item, cj, "denied there")


def _equal(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    if fj != cj:
        yield Widening(key, fj, cj, "must be the same")


def _free(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    return iter(())


def _tmpfs(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    for path, size in c.items():
        if path not in f:
            yield Widening(f"{key}.{path}", None, cj[path], "a tmpfs not there")
        elif size > f[path]:
            yield Widening(f"{key}.{path}", fj[path], cj[path], "larger")


def _host_port(entry: str) -> tuple[str, int]:
    host, sep, port = entry.lower().rstrip(".").rpartition(":")
    if not sep or not port.isdigit():
        return entry.lower().rstrip("."), 443
    return host.rstrip("."), int(port)


def _egress_covered(entry: str, floor: list[str]) -> bool:
    host, port = _host_port(entry)
    for allowed in floor:
        a_host, a_port = _host_port(allowed)
        if a_port != port:
            continue
        if host == a_host:
            return True
        # `*.d` covers any name below d, and any narrower wildcard below d.
        if a_host.startswith("*.") and host.removeprefix("*.").endswith(a_host[1:]):
            return True
    return False


def _egress(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    for entry in cj:
        if not _egress_covered(entry, fj):
            yield Widening(key, fj, entry, "an egress host not allowed there")


def _cidrs(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            return None
    floor_nets = [n for n in map(net, fj) if n is not None]
    for entry in cj:
        n = net(entry)
        covered = n is not None and any(
            n.version == fn.version and n.subnet_of(fn)  # type: ignore[arg-type]
            for fn in floor_nets)
        if not covered and entry not in fj:
            yield Widening(key, fj, entry, "a private range not allowed there")


def _per_tool_caps(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    for tool, cap in f.items():
        if tool not in c:
            yield Widening(f"{key}.{tool}", cap, None, "no cap is unlimited")
        elif c[tool] > cap:
            yield Widening(f"{key}.{tool}", cap, c[tool], "more")


def _mcp_servers(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    def ident(s: dict[str, Any]) -> tuple[Any, Any]:
        return (s.get("command"), s.get("url"))
    floor_by_id = {ident(s): s for s in fj}
    for server in cj:
        name = server.get("command") or server.get("url")
        base = floor_by_id.get(ident(server))
        if base is None:
            yield Widening(key, [s.get("command") or s.get("url") for s in fj], name,
                           "an MCP server not there")
            continue
        for tool in server.get("enabled_tools", []):
            if tool not in base.get("enabled_tools", []):
                yield Widening(f"{key}[{name}].enabled_tools", base.get("enabled_tools", []),
                               tool, "not in the list")


def _tools_allowlist(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    # None: any tool a request offers; a list: only those.
    if fj is None:
        return
    if cj is None:
        yield Widening(key, fj, None, "no list allows every tool")
        return
    yield from _subset(key, fj, cj, f, c)


def _models(key: str, fj: Any, cj: Any, f: Any, c: Any) -> Iterator[Widening]:
    # The provider section's rule covers models, aliases and allow_models together:
    # what matters is the set of model ids a request may name.
    return iter(())


# Every leaf of the policy models, by dotted key. `provider.*` applies when both sides
# have a provider section (see `_provider`).
RULES: dict[str, Rule] = {
    "name": _free,  # a label for reports
    "extends": _free,  # resolved already: the comparison is of the result
    # Another image is another environment (and a Dockerfile is host paths to build):
    # only the floor's own image is within it.
    "image": _equal,
    "filesystem.read_only_root": _must_stay_true,
    "filesystem.tmpfs": _tmpfs,
    "filesystem.exec_tmpfs": _subset,
    "filesystem.workspace": _order("ro", "copy", "rw"),
    "filesystem.copy_size": _more,
    "filesystem.copy_files": _more,
    "filesystem.patch_size": _more,
    "filesystem.patch_file_size": _more,
    "filesystem.allow_sensitive_workspace": _must_stay_false,
    "network.mode": _order("none", "gateway", "proxy"),
    "network.allow": _egress,
    "network.allow_private": _cidrs,
    "network.limits.memory": _more,
    "network.limits.request_body": _more,
    "network.limits.json_nodes": _more,
    "network.limits.connections": _more,
    "network.limits.head_timeout": _more,
    "network.limits.body_timeout": _more,
    "network.limits.refusal_events": _more,
    "network.limits.refusals": _more,
    "process.user": _equal,  # which uid owns what the agent writes is the floor's choice
    "process.capabilities": _subset,
    "process.seccomp.groups": _subset,
    "process.seccomp.allow": _subset,
    "process.seccomp.deny": _superset,
    "process.seccomp.socket_families": _subset,
    "process.seccomp.default_action": _order("kill", "errno"),
    "process.runtime": _order("runsc", "runc"),
    # the same Sentry on either platform: a trade of idle CPU against system-call speed,
    # not of isolation. The service binds it to its floor's (service/floors.py): a host's
    # operator, not a tenant, decides what its idle sandboxes cost.
    "process.gvisor_platform": _free,
    "process.no_new_privileges": _must_stay_true,
    "process.init": _free,  # the shim is PID 1 either way (models.py)
    "resources.memory": _more,
    "resources.cpus": _more,
    "resources.pids": _more,
    "resources.wall_time": _more,
    "resources.output_bytes": _more,
    "resources.log_bytes": _more,
    "resources.nofile": _more,
    "env.allow": _subset,
    "env.set": _free,  # fixed values written in the policy: nothing of the host's
    "approval": _equal,
    "provider.backend": _equal,
    "provider.base_url": _equal,
    "provider.api_key_env": _equal,
    "provider.api_key_file": _equal,
    "provider.models": _models,
    "provider.aliases": _models,
    "provider.allow_models": _models,
    "provider.hosted_tools": _subset,
    "provider.url_sources": _must_stay_false,
    "provider.stored_prompts": _must_stay_false,
    "provider.background": _must_stay_false,
    "provider.tools": _tools_allowlist,
    "provider.project": _equal,
    "provider.region": _equal,
    "provider.replay_file": _equal,
    "provider.ca_file": _equal,
    # A tenant's own prices would make its accounting lie: only the floor's.
    "provider.prices": _equal,
    "budgets.steps": _budget,
    "budgets.requests": _budget,
    "budgets.tokens": _budget,
    "budgets.reserve_output_tokens": _more,
    "budgets.mcp_calls": _budget,
    "mcp.tools": _subset,
    "mcp.servers": _mcp_servers,
    "mcp.builtin": _subset,
    "mcp.per_tool_calls": _per_tool_caps,
    "readiness.selftest": _must_stay_true,
    "readiness.gate": _must_stay_true,
}


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    for c in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def leaf_keys(model: type[BaseModel] = Policy, prefix: str = "") -> list[str]:
    """Every dotted key a comparison covers: fields, descending into nested sections.

    A list or dict of models (mcp.servers, provider.prices) is a leaf: its rule compares
    the items.
    """
    out: list[str] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _sub_model(info.annotation)
        if sub is not None and getattr(info.annotation, "__origin__", None) not in (list, dict):
            out.extend(leaf_keys(sub, f"{key}."))
        else:
            out.append(key)
    return out


def _walk(model: type[BaseModel], prefix: str, f: Any, c: Any, fj: Any,
          cj: Any) -> Iterator[Widening]:
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        fv, cv = getattr(f, name), getattr(c, name)
        fjv, cjv = fj.get(name), cj.get(name)
        sub = _sub_model(info.annotation)
        if sub is not None and getattr(info.annotation, "__origin__", None) not in (list, dict):
            if key == "provider":
                yield from _provider(sub, f"{key}.", fv, cv, fjv, cjv)
            else:
                yield from _walk(sub, f"{key}.", fv, cv, fjv, cjv)
            continue
        yield from RULES.get(key, _equal)(key, fjv, cjv, fv, cv)


def _provider(model: type[BaseModel], prefix: str, f: Any, c: Any, fj: Any,
              cj: Any) -> Iterator[Widening]:
    if f is None:
        return  # the floor leaves the provider open
    if c is None:
        return  # no provider at all: narrower
    yield from _walk(model, prefix, f, c, fj, cj)
    floor_ids = f.allowed_models()
    for model_id in sorted(c.allowed_models() - floor_ids):
        yield Widening("provider.models", sorted(floor_ids), model_id,
                       "a model not listed there")


def widenings_over(floor: Policy, candidate: Policy) -> list[Widening]:
    """Every place where `candidate` is wider than `floor` (both resolved policies)."""
    return list(_walk(Policy, "", floor, candidate, floor.model_dump(mode="json"),
                      candidate.model_dump(mode="json")))
