"""Policies: the design card's example, presets, `policy check` errors, compile, schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.errors import PolicyError
from runner.policy.loader import load_policy, preset_names
from runner.policy.models import Policy, widenings
from tests.conftest import write_policy

DESIGN_EXAMPLE = """\
extends: strict            # a preset name or a relative file
filesystem:
  workspace: copy          # ro | copy | rw
  tmpfs: {/tmp: 256m}
network:
  mode: gateway            # none | gateway | proxy
  allow: []                # extra host:port entries, proxy mode only
process:
  runtime: runsc           # runc | runsc
resources:
  memory: 1g
  cpus: 1.0
  pids: 256
  wall_time: 600s
provider:
  backend: anthropic
  base_url: https://api.anthropic.com
  api_key_env: ANTHROPIC_API_KEY
  models: {default: claude-sonnet-4-5, triage: claude-haiku-4-5}
budgets:
  steps: 50
  requests: 100
  tokens: 2000000
  mcp_calls: 100
"""


def test_design_example_validates_as_written(tmp_path):
    loaded = load_policy(write_policy(tmp_path, DESIGN_EXAMPLE))
    p = loaded.policy
    assert p.filesystem.workspace == "copy"
    assert p.filesystem.tmpfs["/tmp"] == 256 << 20
    assert p.process.runtime == "runsc"
    assert p.resources.wall_time == 600
    assert p.provider is not None and p.provider.resolve_model("triage") == "claude-haiku-4-5"
    assert p.budgets.steps == 50


def test_presets_exist_and_only_tighten():
    assert {"default", "strict", "ci"} <= set(preset_names())
    base = Policy()
    for name in preset_names():
        p = load_policy(name).policy
        # A preset may make the workspace a private copy (never written back) but never rw.
        assert p.filesystem.workspace in ("ro", "copy"), name
        assert p.filesystem.read_only_root
        assert p.network.mode in ("none", "gateway") and not p.network.allow
        assert p.process.capabilities == [] and p.process.no_new_privileges
        assert not p.process.seccomp.allow
        assert p.process.user == base.process.user
        assert widenings(p) == [], name
    strict = load_policy("strict").policy
    assert strict.process.runtime == "runsc"
    assert strict.resources.memory < base.resources.memory
    assert strict.resources.wall_time < base.resources.wall_time
    assert load_policy("default").policy.process.runtime == "runc"


def test_policy_check_reports_each_problem_with_file_and_line(airlock, tmp_path):
    path = write_policy(tmp_path, "extends: nosuch\nfilesystem:\n  workspce: copy\n"
                        "resources:\n  memory: lots\n  pids: many\n")
    r = airlock("policy", "check", path)
    assert r.code == 2
    lines = r.stdout.strip().splitlines()
    assert f"{path}:1: extends: no preset or file named 'nosuch'" in lines[0]
    assert any(line.startswith(f"{path}:3: filesystem.workspce: unknown key") for line in lines)
    assert any(line.startswith(f"{path}:5: resources.memory:") for line in lines)
    assert any(line.startswith(f"{path}:6: resources.pids:") for line in lines)
    assert "Traceback" not in r.stdout + r.stderr


def test_policy_check_takes_a_preset_name_unless_a_file_has_it(tmp_path, monkeypatch):
    from runner.policy.loader import check_files

    monkeypatch.chdir(tmp_path)
    assert check_files(["strict", "default", "ci"]) == []
    (tmp_path / "strict").write_text("resources:\n  pids: many\n")  # a file wins
    assert check_files(["strict"])[0].startswith("strict:2: resources.pids")
    assert "no preset or file named './nosuch'" in check_files(["nosuch"])[0]


def test_errors_point_into_the_file_that_caused_them(tmp_path):
    write_policy(tmp_path, "resources:\n  cpus: 1.0\n  pids: 3\n", "parent.yaml")
    child = write_policy(tmp_path, "extends: parent.yaml\nnetwork: {mode: none}\n", "child.yaml")
    with pytest.raises(PolicyError) as err:
        load_policy(child)
    assert err.value.problems[0].startswith(f"{tmp_path}/parent.yaml:3: resources.pids")


def test_extends_cycle_and_bad_yaml(tmp_path):
    a = write_policy(tmp_path, "extends: b.yaml\n", "a.yaml")
    write_policy(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(PolicyError, match="cycle"):
        load_policy(a)
    bad = write_policy(tmp_path, "filesystem: [\n", "bad.yaml")
    with pytest.raises(PolicyError, match=r"bad.yaml:\d+: YAML"):
        load_policy(bad)


def test_provider_routing_variables_are_refused(tmp_path):
    path = write_policy(tmp_path, "env:\n  allow: [ANTHROPIC_API_KEY, HTTPS_PROXY]\n"
                        "  set: {OPENAI_BASE_URL: http://x}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    text = "\n".join(err.value.problems)
    assert "ANTHROPIC_API_KEY routes to a provider" in text
    assert "OPENAI_BASE_URL" in text


def test_root_and_dangerous_capabilities_are_refused(tmp_path):
    with pytest.raises(PolicyError, match="never runs as uid or gid 0"):
        load_policy(write_policy(tmp_path, "process: {user: '0:0'}\n"))
    with pytest.raises(PolicyError, match="CAP_SYS_ADMIN would break"):
        load_policy(write_policy(tmp_path, "process: {capabilities: [SYS_ADMIN]}\n"))
    with pytest.raises(PolicyError, match="only with mode: proxy"):
        load_policy(write_policy(tmp_path, "network: {allow: ['pypi.org:443']}\n"))


def test_widening_is_explicit_and_listed(tmp_path):
    p = load_policy(write_policy(tmp_path, "filesystem: {workspace: rw}\n"
                                 "network: {mode: proxy, allow: ['pypi.org:443']}\n")).policy
    w = widenings(p)
    assert any("workspace: rw" in x for x in w) and any("pypi.org:443" in x for x in w)


def test_schema_show_and_compile(airlock):
    r = airlock("policy", "schema")
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False
    assert "filesystem" in schema["properties"]
    r = airlock("policy", "show", "strict")
    assert r.code == 0 and "runtime: runsc" in r.stdout and "extends" not in r.stdout
    r = airlock("policy", "compile", "strict")
    assert r.code == 0, r.stderr
    out = json.loads(r.stdout)
    c = out["container"]
    assert c["runtime"] == "runsc" and c["read_only_root"] is True
    assert c["no_new_privileges"] is True and c["cap_add"] == []
    assert c["seccomp_profile"]["defaultAction"] == "SCMP_ACT_ERRNO" or \
        c["seccomp_profile"]["defaultAction"].startswith("SCMP_ACT_KILL")
    assert "noexec" in c["tmpfs"]["/tmp"] and "size=" in c["tmpfs"]["/tmp"]


def test_repo_presets_directory_is_used():
    assert Path(load_policy("default").files[0]).name == "default.yaml"


def test_policy_reference_is_up_to_date():
    from runner.policy.reference import reference_markdown

    committed = (Path(__file__).resolve().parent.parent / "docs" / "policy-reference.md").read_text()
    assert committed == reference_markdown(), "run: airlock policy reference > docs/policy-reference.md"
