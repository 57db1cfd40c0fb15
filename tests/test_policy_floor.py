"""The floor comparator: every way a policy can be wider than another, one test per rule."""

from __future__ import annotations

from typing import Any

import pytest

from runner.policy.floor import RULES, Widening, leaf_keys, widenings_over
from runner.policy.loader import load_policy
from runner.policy.models import Policy


def P(**sections: Any) -> Policy:
    return Policy.model_validate(sections)


def keys(floor: Policy, candidate: Policy) -> list[str]:
    return [w.key for w in widenings_over(floor, candidate)]


def test_every_policy_field_has_a_comparison_rule():
    # A new policy field must get a rule here (runner/policy/floor.py RULES) before it
    # lands: without one it is compared by equality, which is safe but may be too strict.
    missing = sorted(set(leaf_keys()) - set(RULES))
    assert not missing, f"policy fields with no floor rule in runner/policy/floor.py: {missing}"
    stale = sorted(set(RULES) - set(leaf_keys()))
    assert not stale, f"floor rules for fields that no longer exist: {stale}"


def test_a_policy_is_never_wider_than_itself():
    for name in ("default", "strict", "ci"):
        p = load_policy(name).policy
        assert widenings_over(p, p) == [], name
    full = P(network={"mode": "proxy", "allow": ["a.example:443"], "allow_private": ["10.0.0.0/8"]},
             provider={"backend": "anthropic", "models": {"default": "m1"}, "tools": ["t"]},
             mcp={"servers": [{"command": "srv", "enabled_tools": ["x"]}],
                  "per_tool_calls": {"x": 3}},
             budgets={"steps": 1})
    assert widenings_over(full, full) == []


def test_strict_floor_against_presets():
    strict, default, ci = (load_policy(n).policy for n in ("strict", "default", "ci"))
    assert widenings_over(default, strict) == []
    got = {w.key for w in widenings_over(strict, default)}
    assert {"process.runtime", "resources.memory", "resources.wall_time",
            "budgets.steps", "budgets.tokens"} <= got
    assert "filesystem.workspace" in {w.key for w in widenings_over(strict, ci)}


def test_runtime_runc_is_weaker_than_runsc():
    (w,) = widenings_over(P(process={"runtime": "runsc"}), P(process={"runtime": "runc"}))
    assert (w.key, w.floor, w.candidate) == ("process.runtime", "runsc", "runc")
    assert widenings_over(P(process={"runtime": "runc"}), P(process={"runtime": "runsc"})) == []


@pytest.mark.parametrize(("floor", "cand", "wider"), [
    ("none", "gateway", True), ("gateway", "proxy", True), ("none", "proxy", True),
    ("proxy", "gateway", False), ("gateway", "none", False), ("gateway", "gateway", False),
])
def test_network_mode_order(floor, cand, wider):
    assert keys(P(network={"mode": floor}), P(network={"mode": cand})) == (
        ["network.mode"] if wider else [])


def test_egress_hosts_not_in_the_floor():
    floor = P(network={"mode": "proxy", "allow": ["pypi.org:443", "*.pythonhosted.org"]})
    ok = P(network={"mode": "proxy",
                    "allow": ["pypi.org", "files.pythonhosted.org:443", "*.a.pythonhosted.org"]})
    assert widenings_over(floor, ok) == []
    bad = P(network={"mode": "proxy", "allow": ["pypi.org:80", "evil.example:443",
                                                "pythonhosted.org:443"]})
    got = widenings_over(floor, bad)
    assert [w.candidate for w in got] == ["pypi.org:80", "evil.example:443", "pythonhosted.org:443"]
    assert all(w.key == "network.allow" and w.floor == floor.network.allow for w in got)


def test_private_ranges_not_in_the_floor():
    floor = P(network={"mode": "proxy", "allow_private": ["10.0.0.0/8"]})
    assert widenings_over(floor, P(network={"mode": "proxy", "allow_private": ["10.1.0.0/16"]})) == []
    (w,) = widenings_over(floor, P(network={"mode": "proxy", "allow_private": ["192.168.0.0/16"]}))
    assert (w.key, w.candidate) == ("network.allow_private", "192.168.0.0/16")


@pytest.mark.parametrize(("floor", "cand", "wider"), [
    ("ro", "copy", True), ("copy", "rw", True), ("ro", "rw", True),
    ("rw", "ro", False), ("copy", "ro", False), ("copy", "copy", False),
])
def test_workspace_order(floor, cand, wider):
    assert keys(P(filesystem={"workspace": floor}), P(filesystem={"workspace": cand})) == (
        ["filesystem.workspace"] if wider else [])


def test_tmpfs_new_path_or_larger():
    floor = P(filesystem={"tmpfs": {"/tmp": "64m", "/home/airlock": "32m"}})
    assert widenings_over(floor, P(filesystem={"tmpfs": {"/tmp": "32m"}})) == []
    got = widenings_over(floor, P(filesystem={"tmpfs": {"/tmp": "128m", "/home/airlock": "32m",
                                                        "/cache": "1m"}}))
    assert [(w.key, w.floor, w.candidate) for w in got] == [
        ("filesystem.tmpfs./tmp", "64m", "128m"), ("filesystem.tmpfs./cache", None, "1m")]


def test_exec_tmpfs_where_the_floor_had_noexec():
    floor = P(filesystem={"tmpfs": {"/tmp": "64m"}})
    (w,) = widenings_over(floor, P(filesystem={"tmpfs": {"/tmp": "64m"}, "exec_tmpfs": ["/tmp"]}))
    assert (w.key, w.candidate) == ("filesystem.exec_tmpfs", "/tmp")


def test_sensitive_workspace_allowed():
    assert keys(P(), P(filesystem={"allow_sensitive_workspace": True})) == [
        "filesystem.allow_sensitive_workspace"]
    assert keys(P(filesystem={"allow_sensitive_workspace": True}), P()) == []


def test_writable_root():
    assert keys(P(), P(filesystem={"read_only_root": False})) == ["filesystem.read_only_root"]
    assert keys(P(filesystem={"read_only_root": False}), P()) == []


@pytest.mark.parametrize(("field", "floor", "cand"), [
    ("memory", "512m", "8g"), ("cpus", 1.0, 2.0), ("pids", 256, 60000),
    ("wall_time", "300s", "100h"), ("output_bytes", "4m", "5m"), ("nofile", 512, 1024),
])
def test_more_resources(field, floor, cand):
    (w,) = widenings_over(P(resources={field: floor}), P(resources={field: cand}))
    assert w.key == f"resources.{field}"
    assert widenings_over(P(resources={field: cand}), P(resources={field: floor})) == []


@pytest.mark.parametrize("field", ["steps", "requests", "tokens", "mcp_calls"])
def test_budgets_more_or_missing(field):
    floor = P(budgets={field: 10})
    (w,) = widenings_over(floor, P(budgets={field: 11}))
    assert (w.key, w.floor, w.candidate) == (f"budgets.{field}", 10, 11)
    (w,) = widenings_over(floor, P())
    assert (w.key, w.floor, w.candidate) == (f"budgets.{field}", 10, None)
    assert widenings_over(floor, P(budgets={field: 9})) == []
    assert widenings_over(P(), P(budgets={field: 9})) == []


def test_env_allow_extra_names():
    floor = P(env={"allow": ["LANG"]})
    (w,) = widenings_over(floor, P(env={"allow": ["LANG", "HOME"]}))
    assert (w.key, w.candidate) == ("env.allow", "HOME")
    # Fixed values come from the policy itself, never from the host.
    assert widenings_over(floor, P(env={"allow": ["LANG"], "set": {"X": "1"}})) == []


def test_capabilities_added():
    (w,) = widenings_over(P(), P(process={"capabilities": ["CHOWN"]}))
    assert (w.key, w.candidate) == ("process.capabilities", "CHOWN")


def test_seccomp_rules():
    base = P()
    few = P(process={"seccomp": {"groups": ["file-io", "memory"]}})
    assert "process.seccomp.groups" in keys(few, base)
    assert keys(base, few) == []
    assert keys(P(process={"seccomp": {"deny": ["unshare"]}}), base) == ["process.seccomp.deny"]
    assert keys(P(process={"seccomp": {"socket_families": ["unix"]}}), base) == [
        "process.seccomp.socket_families", "process.seccomp.socket_families"]
    assert keys(P(process={"seccomp": {"default_action": "kill"}}), base) == [
        "process.seccomp.default_action"]
    assert keys(base, P(process={"seccomp": {"default_action": "kill"}})) == []


def _allowable(name: str) -> bool:
    try:
        P(process={"seccomp": {"allow": [name]}})
        return True
    except Exception:
        return False


def test_seccomp_allow_extra_syscall():
    name = next(n for n in ("mlock", "sched_setaffinity", "setns", "ptrace") if _allowable(n))
    (w,) = widenings_over(P(), P(process={"seccomp": {"allow": [name]}}))
    assert (w.key, w.candidate) == ("process.seccomp.allow", name)


def test_no_new_privileges_off():
    assert keys(P(), P(process={"no_new_privileges": False})) == ["process.no_new_privileges"]


def test_user_must_equal():
    assert keys(P(), P(process={"user": "2000:2000"})) == ["process.user"]


def test_readiness_off():
    assert keys(P(), P(readiness={"selftest": False})) == ["readiness.selftest"]
    assert keys(P(), P(readiness={"gate": False})) == ["readiness.gate"]


PROV = {"backend": "anthropic", "base_url": "https://up.example", "api_key_env": "K",
        "models": {"default": "m1"}, "aliases": {"one": "m1"}, "allow_models": ["m2"]}


@pytest.mark.parametrize(("field", "value"), [
    ("backend", "openai"), ("base_url", "https://other.example"), ("api_key_env", "OTHER"),
    ("ca_file", "/tmp/ca.pem"), ("project", "p"), ("region", "r"),
])
def test_provider_fields_must_equal(field, value):
    (w,) = widenings_over(P(provider=PROV), P(provider={**PROV, field: value}))
    assert (w.key, w.floor, w.candidate) == (f"provider.{field}", PROV.get(field), value)


def test_provider_key_file_and_replay_must_equal():
    floor = P(provider={"backend": "replay", "replay_file": "a.jsonl"})
    assert keys(floor, P(provider={"backend": "replay", "replay_file": "b.jsonl"})) == [
        "provider.replay_file"]
    assert keys(floor, P(provider={"backend": "replay", "replay_file": "a.jsonl",
                                   "api_key_file": "/k"})) == ["provider.api_key_file"]


def test_models_the_floor_does_not_list():
    floor = P(provider=PROV)
    ok = P(provider={**PROV, "models": {"default": "m2", "triage": "m1"}, "aliases": {},
                     "allow_models": []})
    assert widenings_over(floor, ok) == []
    got = widenings_over(floor, P(provider={**PROV, "aliases": {"big": "m9"},
                                            "allow_models": ["m2", "m8"]}))
    assert [(w.key, w.candidate) for w in got] == [("provider.models", "m8"),
                                                   ("provider.models", "m9")]


def test_provider_tools_and_hosted_tools():
    floor = P(provider={**PROV, "tools": ["read"]})
    assert keys(floor, P(provider={**PROV, "tools": ["read", "write"]})) == ["provider.tools"]
    assert keys(floor, P(provider=PROV)) == ["provider.tools"]  # no list: every tool
    assert keys(P(provider=PROV), floor) == []
    assert keys(P(provider=PROV), P(provider={**PROV, "hosted_tools": ["web_search"]})) == [
        "provider.hosted_tools"]


def test_a_floor_without_provider_leaves_it_open_and_none_is_narrower():
    assert widenings_over(P(), P(provider=PROV)) == []
    assert widenings_over(P(provider=PROV), P()) == []


def test_mcp_rules():
    floor = P(mcp={"tools": ["m:f"], "servers": [{"command": "srv", "enabled_tools": ["a"]}],
                   "per_tool_calls": {"a": 5}})
    assert widenings_over(floor, P(mcp={"servers": [{"command": "srv", "enabled_tools": ["a"]}],
                                        "per_tool_calls": {"a": 2}})) == []
    got = widenings_over(floor, P(mcp={
        "tools": ["m:f", "m:g"], "builtin": ["submit_result"],
        "servers": [{"command": "srv", "enabled_tools": ["a", "b"]}, {"url": "http://x"}],
        "per_tool_calls": {"a": 6}}))
    assert [(w.key, w.candidate) for w in got] == [
        ("mcp.tools", "m:g"), ("mcp.servers[srv].enabled_tools", "b"),
        ("mcp.servers", "http://x"), ("mcp.builtin", "submit_result"),
        ("mcp.per_tool_calls.a", 6)]
    (w,) = widenings_over(floor, P(mcp={"tools": ["m:f"], "servers": [
        {"command": "srv", "enabled_tools": ["a"]}]}))
    assert (w.key, w.floor, w.candidate) == ("mcp.per_tool_calls.a", 5, None)


def test_widening_reads_and_serialises():
    (w,) = widenings_over(P(resources={"memory": "512m"}), P(resources={"memory": "8g"}))
    assert isinstance(w, Widening)
    assert w.as_dict() == {"key": "resources.memory", "floor": "512m", "candidate": "8g",
                           "why": "more"}
    assert str(w) == "resources.memory: 8g, wider than 512m (more)"


def test_prices_must_equal_the_floors():
    prov = {"backend": "anthropic", "prices": {"*": {"input_per_mtok": 3, "output_per_mtok": 15}}}
    cheaper = {**prov, "prices": {"*": {"input_per_mtok": 0, "output_per_mtok": 0}}}
    assert keys(P(provider=prov), P(provider=cheaper)) == ["provider.prices"]
    assert keys(P(provider=prov), P(provider={"backend": "anthropic"})) == ["provider.prices"]
    assert keys(P(provider=prov), P(provider=prov)) == []
