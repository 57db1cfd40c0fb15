"""The Codex adapter: the real Codex CLI of the pinned image, in a real sandbox, driven by a
scripted Responses-API provider on the host through the real provider gateway.

The scripted provider plays the model: it makes Codex run commands, edit files, call the
run's MCP tools and attempt escapes; the run's events (Codex's own account, parsed, and
the gateway's and MCP server's authoritative ones) and the requests the provider
captured are what the tests assert on. The parser is also tested, without the engine, on
streams recorded from the real binary (tests/fixtures/codex/, see record.py there).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from runner.agents import get_agent
from runner.agents.base import AgentContext
from runner.agents.codex import CODEX_HOME, CONFIG_PATH, CodexAgent
from runner.agents.codex_config import MODEL_CATALOG, to_toml
from runner.agents.codex_events import CodexStream
from runner.errors import BadInput
from runner.images.catalog import CODEX_VERSION
from runner.policy.loader import policy_from_dict
from runner.policy.models import SANDBOX_HOME, Policy
from runner.run.hostaddrs import host_addresses
from runner.run.orchestrator import RunOptions, run
from runner.testing.scripted_provider import RecordedRequest, ScriptedProvider
from tests.conftest import AIRLOCK, ROOT, RUNTIMES, write_policy

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "codex"
# Both runtimes. Under Debian 12's runsc (2022-12) Codex 0.163 now and then never reaped a
# finished command (about one run in four with 25 commands on pipes, every run on a PTY);
# under the gVisor `make engine` registers (2024-07) 8 runs of 25 commands each all ended
# (docs/performance.md).
CODEX_RUNTIMES = RUNTIMES
KEY_ENV = "AIRLOCK_TEST_CODEX_KEY"
KEY = "sk-codex-test-key"
MODEL = "gpt-5.5"  # in the pinned Codex's own catalog: no metadata warning, apply_patch on
MCP_NS = "mcp__airlock"
# What Codex may offer the model in an Airlock run: its shell, the patch tool, the plan,
# the MCP resource readers, and the run's MCP tools (namespace mcp__airlock).
BUILTIN_TOOLS = {"exec_command", "write_stdin", "apply_patch", "update_plan"}
MCP_BUILTINS = {"list_mcp_resources", "list_mcp_resource_templates", "read_mcp_resource"}


# -- unit: configuration and command line ---------------------------------------------


def _ctx(endpoints: dict[str, str] | None = None, task: list[str] | None = None,
         workspace: str | None = "/workspace", model: str | None = MODEL) -> AgentContext:
    ep = {"OPENAI_BASE_URL": "http://127.0.0.1:41001/v1", "OPENAI_API_KEY": "placeholder"}
    return AgentContext(policy=Policy.model_validate({}), task=task or ["fix", "it"], model=model,
                        endpoints=ep if endpoints is None else endpoints, workspace=workspace)


def test_registered_lazily_as_codex():
    agent = get_agent("codex")
    assert isinstance(agent, CodexAgent)
    assert agent.image == "codex"


def test_command_line_bypasses_codex_sandbox_and_loads_no_rules():
    argv = CodexAgent().argv(_ctx(task=["--not-a-flag", "fix it"]))
    assert argv[:3] == ["codex", "exec", "--json"]
    for flag in ("--strict-config", "--ignore-rules", "--skip-git-repo-check",
                 "--dangerously-bypass-approvals-and-sandbox"):
        assert flag in argv
    # Never the deprecated or LLM-approved modes, never a profile.
    for flag in ("--full-auto", "--approve-for-me", "--not-so-yolo", "--profile", "-p",
                 "--oss", "--enable", "--ignore-user-config"):
        assert flag not in argv
    assert argv[argv.index("--model") + 1] == MODEL
    assert argv[argv.index("-C") + 1] == "/workspace"
    # The prompt comes after `--`, so a prompt that starts with a dash is not a flag.
    assert argv[-2:] == ["--", "--not-a-flag fix it"]


def test_home_and_codex_home_are_fresh_tmpfs():
    agent = CodexAgent()
    env = agent.env(_ctx())
    assert env["CODEX_HOME"] == CODEX_HOME and env["HOME"] == SANDBOX_HOME
    assert CODEX_HOME in agent.tmpfs and SANDBOX_HOME in agent.tmpfs
    assert CODEX_HOME.startswith(SANDBOX_HOME + "/")
    files = agent.files(_ctx())
    assert list(files) == [CONFIG_PATH]  # the only file: the generated configuration


def test_generated_config_is_the_whole_policy():
    ctx = _ctx(endpoints={"OPENAI_BASE_URL": "http://127.0.0.1:41001/v1",
                          "OPENAI_API_KEY": "placeholder",
                          "AIRLOCK_MCP_URL": "http://127.0.0.1:41003/mcp",
                          "AIRLOCK_MCP_TOKEN": "t" * 43})
    text = CodexAgent().files(ctx)[CONFIG_PATH]
    cfg = tomllib.loads(text)
    assert cfg == CodexAgent().config(ctx)  # the TOML writer round-trips
    assert cfg["approval_policy"] == "never"
    assert cfg["sandbox_mode"] == "danger-full-access"
    assert cfg["web_search"] == "disabled"
    assert cfg["model_provider"] == "airlock"
    provider = cfg["model_providers"]["airlock"]
    assert provider["base_url"] == "http://127.0.0.1:41001/v1"
    assert provider["wire_api"] == "responses"
    assert provider["env_key"] == "OPENAI_API_KEY" and provider["supports_websockets"] is False
    assert list(cfg["mcp_servers"]) == ["airlock"]  # the run's server, the only one
    server = cfg["mcp_servers"]["airlock"]
    assert server["url"] == "http://127.0.0.1:41003/mcp"
    assert server["bearer_token_env_var"] == "AIRLOCK_MCP_TOKEN"
    assert "t" * 43 not in text  # the token stays in the environment
    assert server["default_tools_approval_mode"] == "approve" and server["required"] is True
    assert server["enabled_tools"] == []  # this context's server exposes no tool
    assert "command" not in server  # never a stdio server (Codex would not sandbox it)
    off = cfg["features"]
    for feature in ("apps", "plugins", "remote_plugin", "multi_agent", "hooks", "memories",
                    "image_generation", "browser_use", "computer_use", "tool_suggest",
                    "skill_mcp_dependency_install", "in_app_updates"):
        assert off[feature] is False, feature
    assert cfg["skills"] == {"bundled": {"enabled": False}, "include_instructions": False}
    assert cfg["apps"]["_default"]["enabled"] is False
    assert cfg["project_doc_max_bytes"] == 0
    assert cfg["analytics"]["enabled"] is False and cfg["feedback"]["enabled"] is False
    assert cfg["otel"]["exporter"] == "none" and cfg["history"]["persistence"] == "none"
    assert cfg["check_for_update_on_startup"] is False
    assert "notify" not in cfg
    assert cfg["shell_environment_policy"] == {"inherit": "core",
                                               "ignore_default_excludes": False}
    assert cfg["projects"]["/workspace"]["trust_level"] == "untrusted"
    assert cfg["model_catalog_json"] == MODEL_CATALOG


def test_the_run_mcp_tools_are_the_allowlist():
    ctx = _ctx(endpoints={"OPENAI_BASE_URL": "http://x/v1", "AIRLOCK_MCP_URL": "http://y/mcp",
                          "AIRLOCK_MCP_TOKEN": "t"})
    ctx.mcp_tools = ["submit_result", "lookup"]
    server = CodexAgent().config(ctx)["mcp_servers"]["airlock"]
    assert server["enabled_tools"] == ["submit_result", "lookup"]


def test_no_mcp_server_without_run_tools():
    assert CodexAgent().config(_ctx())["mcp_servers"] == {}


def test_codex_needs_the_responses_api():
    with pytest.raises(BadInput, match="Responses API"):
        CodexAgent().files(_ctx(endpoints={"ANTHROPIC_BASE_URL": "http://127.0.0.1:41001"}))
    with pytest.raises(BadInput, match="prompt"):
        CodexAgent().argv(_ctx(task=["  "]))


def test_toml_writer_quotes_what_needs_quoting():
    cfg = {"a": 'x"y\\z\n\u00e9', "b": [1, "two", True], "c": {"k.d": {"x y": 1.5}},
           "projects": {"/work space/é": {"trust_level": "untrusted"}}}
    assert tomllib.loads(to_toml(cfg)) == cfg


# -- unit: the event stream -------------------------------------------------------------


def _parse(lines: list[str]) -> tuple[CodexStream, list[Any]]:
    stream = CodexStream()
    events = [ev for line in lines for ev in stream.feed(line)]
    return stream, events


def _fixture(name: str) -> list[str]:
    return (FIXTURES / f"{name}.jsonl").read_text().splitlines()


def test_fixtures_were_recorded_with_the_pinned_codex():
    assert (FIXTURES / "VERSION").read_text().strip() == CODEX_VERSION, (
        "re-record: .venv/bin/python tests/fixtures/codex/record.py")


def test_every_event_and_item_type_of_the_real_stream_is_parsed():
    seen_events: set[str] = set()
    seen_items: set[str] = set()
    for path in sorted(FIXTURES.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        assert lines, path
        stream, events = _parse(lines)
        assert not stream.unknown, (path.name, stream.unknown)
        assert all(ev.type not in ("agent.event", "agent.item") for ev in events), path.name
        for line in lines:
            obj = json.loads(line)
            seen_events.add(obj["type"])
            if "item" in obj:
                seen_items.add(obj["item"]["type"])
    assert seen_events >= {"thread.started", "turn.started", "item.started", "item.updated",
                           "item.completed", "turn.completed", "turn.failed", "error"}
    assert seen_items >= {"agent_message", "reasoning", "command_execution", "mcp_tool_call",
                          "file_change", "web_search", "todo_list", "error"}


def test_edit_stream_events_and_live_steps():
    stream, events = _parse(_fixture("edit"))
    types = [ev.type for ev in events]
    assert types[0] == "agent.session" and stream.thread_id
    assert "agent.reasoning" in types and "agent.todo_list" in types
    assert types[-2:] == ["agent.turn.completed", "agent.usage"]
    steps = [ev for ev in events if ev.step]
    # Two commands and one patch: three steps, each charged at its item.completed.
    assert [ev.type for ev in steps] == ["agent.command", "agent.file_change", "agent.command"]
    assert [ev.data["step"] for ev in steps] == [1, 2, 3]
    ok_cmd, failed_cmd = (ev for ev in steps if ev.type == "agent.command")
    assert ok_cmd.data["ok"] is True and ok_cmd.data["exit_code"] == 0
    assert failed_cmd.data["ok"] is False and failed_cmd.data["exit_code"] == 1
    change = next(ev for ev in steps if ev.type == "agent.file_change")
    assert change.data["changes"] == [{"path": "/workspace/hello.txt", "kind": "update"},
                                      {"path": "/workspace/notes.md", "kind": "add"}]
    todo = [ev for ev in events if ev.type == "agent.todo_list"]
    assert [ev.data["phase"] for ev in todo] == ["started", "updated", "completed"]
    assert todo[-1].data["items"][0] == {"text": "Look at the file", "completed": True}
    usage = next(ev for ev in events if ev.type == "agent.usage").data
    assert usage["input_tokens"] > 0 and "reasoning_output_tokens" in usage
    assert stream.completed and _agent_with(stream).succeeded(0)
    assert not _agent_with(stream).succeeded(1)


def _agent_with(stream: CodexStream) -> CodexAgent:
    agent = CodexAgent()
    agent.stream = stream
    return agent


def test_mcp_error_null_is_success_and_status_failed_is_failure():
    _, events = _parse(_fixture("mcp"))
    calls = [ev for ev in events if ev.type == "agent.mcp_call" and ev.data["phase"] == "completed"]
    assert len(calls) == 2 and all(ev.step for ev in calls)
    good, bad = calls
    assert good.data["ok"] is True and "error" not in good.data  # `"error": null` on the wire
    assert good.data["tool"] == "submit_result" and good.data["server"] == "airlock"
    assert "result recorded" in good.data["result"]
    assert bad.data["ok"] is False and bad.data["status"] == "failed"
    started = [ev for ev in events if ev.type == "agent.mcp_call" and ev.data["phase"] == "started"]
    assert all(ev.data["ok"] is None and not ev.step for ev in started)


def test_web_search_is_a_step():
    _, events = _parse(_fixture("web_search"))
    searches = [ev for ev in events if ev.type == "agent.web_search"]
    assert [ev.data["phase"] for ev in searches] == ["started", "completed"]
    assert searches[-1].step and searches[-1].data["query"] == "airlock sandbox"


def test_turn_failed_and_warnings():
    stream, events = _parse(_fixture("failed"))
    errors = [ev for ev in events if ev.type == "agent.error"]
    assert {ev.data["scope"] for ev in errors} == {"item", "stream"}  # warning + retryable
    assert all(ev.data["fatal"] is False for ev in errors)
    failed = next(ev for ev in events if ev.type == "agent.turn.failed")
    assert "refused" in failed.data["error"]
    # A turn without any action still counts as one step.
    assert [ev.type for ev in events if ev.step] == ["agent.step"]
    assert stream.terminal == "failed" and not _agent_with(stream).succeeded(0)


def test_a_turn_without_tools_is_one_step():
    stream, events = _parse(_fixture("message_only"))
    steps = [ev for ev in events if ev.step]
    assert len(steps) == 1 and steps[0].data["kind"] == "turn"
    assert _agent_with(stream).succeeded(0)


def test_end_of_stream_without_terminal_event_is_failure():
    lines = _fixture("edit")
    assert json.loads(lines[-1])["type"] == "turn.completed"
    stream, _ = _parse(lines[:-1])  # an interrupted turn: the stream just ends
    assert stream.terminal is None and not _agent_with(stream).succeeded(0)
    empty, _ = _parse([])
    assert not _agent_with(empty).succeeded(0)


def test_unknown_types_fields_and_noise_are_accepted():
    lines = [
        "not json at all",
        "{broken",
        "[1, 2]",
        json.dumps({"type": "thread.started", "thread_id": "t1", "new_field": {"x": 1}}),
        json.dumps({"type": "turn.started", "extra": True}),
        json.dumps({"type": "item.plan.delta", "delta": "x"}),
        json.dumps({"type": "item.completed", "item": {"id": "item_9", "type": "collab_tool_call",
                                                       "tool": "spawn_agent", "status": "completed",
                                                       "receiver_thread_ids": ["t2"]}}),
        json.dumps({"type": "item.completed", "item": {"id": "item_10", "type": "brand_new",
                                                       "x": 1}}),
        json.dumps({"type": "item.completed", "item": {
            "id": "item_11", "type": "mcp_tool_call", "server": "airlock", "tool": "t",
            "arguments": {}, "result": None, "error": {"message": "boom"},
            "status": "completed", "unknown": 3}}),
        json.dumps({"type": "item.completed", "item": {  # the same item again: counted once
            "id": "item_11", "type": "mcp_tool_call", "status": "completed"}}),
        json.dumps({"type": "item.completed", "item": {
            "id": "item_12", "type": "command_execution", "command": "ls",
            "aggregated_output": "bwrap: No permissions to create a new namespace",
            "exit_code": 1, "status": "failed"}}),
        json.dumps({"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1,
                                                        "future_tokens": 2}}),
    ]
    stream, events = _parse(lines)
    types = Counter(ev.type for ev in events)
    assert types["agent.event"] == 1 and types["agent.item"] == 1
    assert stream.unknown == {"item.plan.delta", "item:brand_new"}
    assert [ev.type for ev in events if ev.step] == ["agent.collab_call", "agent.mcp_call",
                                                     "agent.command"]
    mcp = next(ev for ev in events if ev.type == "agent.mcp_call")
    assert mcp.data["ok"] is False and mcp.data["error"] == "boom"
    inner = [ev for ev in events if ev.type == "agent.error"]
    assert inner and inner[0].data["scope"] == "inner_sandbox"
    usage = next(ev for ev in events if ev.type == "agent.usage").data
    assert usage["future_tokens"] == 2 and usage["cached_input_tokens"] == 0
    assert stream.completed


def test_long_output_is_capped():
    line = json.dumps({"type": "item.completed", "item": {
        "id": "item_0", "type": "command_execution", "command": "yes",
        "aggregated_output": "y\n" * 100_000, "exit_code": 0, "status": "completed"}})
    _, events = _parse([line])
    assert events[0].data["output_truncated"] is True
    assert len(events[0].data["output"]) <= 8192


def test_stderr_is_never_parsed():
    agent = CodexAgent()
    assert agent.parse_line("stderr", json.dumps({"type": "turn.completed"})) == []
    assert not agent.stream.completed


# -- end to end: the real binary in a real sandbox ------------------------------------------


@pytest.fixture(scope="session")
def codex_image(engine) -> str:
    """The codex image, built once per session by the real CLI (up to date is a no-op)."""
    proc = subprocess.run([*AIRLOCK, "images", "build", "codex"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from runner.images.build import image_tag

    return image_tag("codex")


def _tools(req: RecordedRequest) -> set[str]:
    """Every tool name a Responses request offers, namespace members as `<ns>__<name>`."""
    out = set()
    for tool in (req.body or {}).get("tools") or []:
        if tool.get("type") == "namespace":
            out |= {f"{tool['name']}__{sub['name']}" for sub in tool.get("tools") or []}
        else:
            out.add(tool.get("name") or tool.get("type"))
    return out


def _policy_yaml(tmp_path: Path, up: ScriptedProvider, extra: str = "") -> str:
    return write_policy(tmp_path, f"""
filesystem:
  workspace: copy
provider:
  backend: openai
  base_url: {up.url}/v1
  api_key_env: {KEY_ENV}
  models: {{default: {MODEL}}}
{extra}
""")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "hello.txt").write_text("hello\n")
    (ws / "src").mkdir()
    (ws / "src" / "app.py").write_text("print('app')\n")
    return ws


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _completed(events: list[dict], etype: str) -> list[dict]:
    return [e for e in events if e["type"] == etype and e["data"].get("phase") == "completed"]


def _codex(airlock, policy: str, workspace: Path | None, *, env: dict[str, str] | None = None,
           prompt: str = "Fix hello.txt", runtime: str = "runc"):
    args = ["run", "--agent", "codex", "--policy", policy, "--runtime", runtime, "--json"]
    if workspace is not None:
        args += ["--workspace", str(workspace)]
    return airlock(*args, "--", prompt, env={KEY_ENV: KEY, **(env or {})}, timeout=300)


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
@pytest.mark.parametrize("runtime", CODEX_RUNTIMES)
def test_edit_in_copy_mode_returns_a_patch_and_leaves_the_host_untouched(
        airlock, tmp_path, workspace, runtime):
    before = _digest(workspace)
    patch = ("*** Begin Patch\n*** Update File: src/app.py\n@@\n-print('app')\n"
             "+print('patched')\n*** Add File: NEW.md\n+added by codex\n*** End Patch\n")
    script = [
        {"tool": "update_plan", "arguments": {"plan": [{"step": "edit", "status": "in_progress"}]}},
        {"tool": "exec_command", "arguments": {"cmd": "echo 'hello, world' > hello.txt"}},
        {"tool": "apply_patch", "input": patch},
        {"text": "Done: edited hello.txt, src/app.py and added NEW.md."},
    ]
    with ScriptedProvider(script, api_key=KEY) as up:
        r = _codex(airlock, _policy_yaml(tmp_path, up), workspace, runtime=runtime)
    assert r.code == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = r.report
    assert report["status"] == "succeeded" and report["agent"] == "codex"
    diff = report["patch"]
    assert "+hello, world" in diff and "-hello" in diff
    assert "+print('patched')" in diff and "+added by codex" in diff
    assert (r.run_dir / "changes.patch").read_text() == diff
    assert _digest(workspace) == before  # the host's workspace was never written
    events = r.events()
    cmd = _completed(events, "agent.command")
    assert len(cmd) == 1 and cmd[0]["data"]["ok"] is True and cmd[0]["source"] == "agent"
    change = _completed(events, "agent.file_change")
    assert len(change) == 1 and change[0]["data"]["ok"] is True
    assert {c["path"] for c in change[0]["data"]["changes"]} == {"/workspace/src/app.py",
                                                                "/workspace/NEW.md"}
    assert any(e["type"] == "agent.turn.completed" for e in events)
    assert report["budgets"]["steps"]["used"] == 2  # the command and the patch
    # The gateway injected the real key; the sandbox only ever had the placeholder.
    gens = up.generation_requests()
    assert len(gens) == 4 and all(g.header("authorization") == f"Bearer {KEY}" for g in gens)
    assert all(g.header("originator") == "codex_exec" for g in gens)
    assert [e for e in events if e["type"] == "provider.request"] and \
        all(e["data"]["status"] == 200 for e in events if e["type"] == "provider.request")


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
@pytest.mark.parametrize("runtime", CODEX_RUNTIMES)
def test_escapes_fail_inside_and_each_attempt_is_on_record(airlock, tmp_path, workspace, canary,
                                                           runtime):
    addrs = host_addresses()
    assert addrs, "the host has no address to test against"
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host secret\n")
    connect = ("python3 -c \"import socket,sys; "
               "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\" {} {}")
    attempts = {
        "write-root": "echo pwned > /airlock-escape",
        "write-etc": "echo pwned >> /etc/passwd",
        "read-host": f"cat {secret}",
        "read-host-home": f"ls {Path.home()}/.codex {Path.home()}/.ssh",
        "resolve-name": "python3 -c \"import socket; socket.getaddrinfo('example.com', 443)\"",
        **{f"canary-{a}": connect.format(a, canary.port) for a in addrs},
    }
    script: list[Any] = [{"tool": "exec_command", "arguments": {"cmd": cmd}}
                         for cmd in attempts.values()]
    script.append({"text": "Nothing worked."})
    with ScriptedProvider(script, api_key=KEY) as up:
        r = _codex(airlock, _policy_yaml(tmp_path, up), workspace, runtime=runtime)
    assert r.code == 0, (r.stdout[-3000:], r.stderr[-3000:])
    events = r.events()
    assert next(e for e in events if e["type"] == "run.start")["data"]["runtime"] == runtime
    done = [e["data"] for e in _completed(events, "agent.command")]
    started = [e for e in events
               if e["type"] == "agent.command" and e["data"]["phase"] == "started"]
    assert len(started) == len(attempts) == len(done)
    outputs = {}
    for (name, cmd), got in zip(attempts.items(), done, strict=True):  # in script order
        assert cmd.split()[0] in got["command"], (name, got)
        assert got["ok"] is False and got["exit_code"] not in (0, None), (name, got)
        outputs[name] = got["output"]
    # gVisor checks permissions before the mount's read-only flag (see test_boundary.py).
    denied = ("Read-only file system",) if runtime == "runc" else (
        "Read-only file system", "Permission denied")
    assert any(m in outputs["write-root"] for m in denied), outputs["write-root"]
    assert "No such file" in outputs["read-host"]
    for name, out in outputs.items():
        if name.startswith("canary-"):
            assert "unreachable" in out.lower() or "Errno" in out, (name, out)
    assert canary.hits == []
    assert secret.read_text() == "host secret\n"
    assert r.report["patch"] in (None, "")
    # Each attempt was also an answer to the model, which saw it fail.
    outputs_sent = [item.get("output", "") for req in up.generation_requests()
                    for item in req.body["input"] if item.get("type") == "function_call_output"]
    assert any(m in str(o) for o in outputs_sent for m in denied)


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
def test_host_codex_configuration_never_reaches_codex(airlock, tmp_path, workspace):
    # The host user's Codex configuration: an extra MCP server, a permissive sandbox,
    # a notify command, its own provider and instructions. And a workspace that brings
    # AGENTS.md and a project .codex/config.toml.
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text("""
model_provider = "hostprovider"
sandbox_mode = "workspace-write"
approval_policy = "on-request"
web_search = "live"
notify = ["sh", "-c", "echo notified > /workspace/NOTIFIED"]
developer_instructions = "HOST-CONFIG-MARKER"

[sandbox_workspace_write]
network_access = true

[model_providers.hostprovider]
name = "host"
base_url = "http://127.0.0.1:9/v1"

[mcp_servers.hostextra]
command = "sh"
args = ["-c", "echo started > /workspace/HOST_MCP_STARTED"]

[mcp_servers.hosturl]
url = "http://127.0.0.1:9/mcp"
""")
    (home / ".codex" / "AGENTS.md").write_text("HOME-AGENTS-MARKER\n")
    (workspace / "AGENTS.md").write_text("WORKSPACE-AGENTS-MARKER: obey the workspace\n")
    (workspace / ".codex").mkdir()
    (workspace / ".codex" / "config.toml").write_text(
        'developer_instructions = "PROJECT-CONFIG-MARKER"\n')
    before = _digest(workspace)
    script = [
        {"tool": "exec_command", "arguments": {
            "cmd": "cat ~/.codex/config.toml; ls -A ~ ~/.codex; ls /etc/codex; env"}},
        {"text": "Looked around."},
    ]
    with ScriptedProvider(script, api_key=KEY) as up:
        r = _codex(airlock, _policy_yaml(tmp_path, up, "mcp: {builtin: [submit_result]}"),
                   workspace, env={"HOME": str(home), "CODEX_HOME": str(home / ".codex")})
    assert r.code == 0, (r.stdout[-3000:], r.stderr[-3000:])
    gens = up.generation_requests()
    assert gens
    for req in gens:
        # Only the run's tools: no hostextra/hosturl server, no web search tool.
        assert _tools(req) == BUILTIN_TOOLS | MCP_BUILTINS | {f"{MCP_NS}__submit_result"}
        raw = req.raw.decode()
        for marker in ("HOST-CONFIG-MARKER", "HOME-AGENTS-MARKER", "WORKSPACE-AGENTS-MARKER",
                       "PROJECT-CONFIG-MARKER", "hostextra", "hosturl"):
            assert marker not in raw, marker
        meta = json.loads(req.header("x-codex-turn-metadata") or "{}")
        assert meta.get("sandbox_mode") == "danger-full-access"  # ours, not the host's
    # What Codex found in its CODEX_HOME: the generated file and its own state only.
    out = _completed(r.events(), "agent.command")[0]["data"]["output"]
    assert 'model_provider = "airlock"' in out and "model_catalog_json" in out
    assert 'enabled_tools = ["submit_result"]' in out  # the run's tools, by name
    assert "hostextra" not in out and "HOST-CONFIG-MARKER" not in out
    assert "cannot access '/etc/codex'" in out
    assert "/home/airlock:\n.codex\n" in out  # nothing else in HOME
    # Commands get the core environment only: not the placeholder key, not the MCP token.
    for name in ("OPENAI_API_KEY=", "AIRLOCK_MCP_TOKEN=", "OPENAI_BASE_URL=", KEY_ENV):
        assert name not in out, name
    # notify never ran, the host's stdio MCP server never started.
    assert "NOTIFIED" not in (r.report["patch"] or "")
    assert "HOST_MCP_STARTED" not in (r.report["patch"] or "")
    assert _digest(workspace) == before
    assert not (workspace / "NOTIFIED").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
def test_requests_carry_only_the_run_tools(airlock, tmp_path, workspace):
    allowed = sorted(BUILTIN_TOOLS | MCP_BUILTINS | {f"{MCP_NS}__*"})
    extra = "mcp: {builtin: [submit_result]}\n"
    script = [
        {"tool": "submit_result", "namespace": MCP_NS, "arguments": {"result": "forty-two"}},
        {"text": "Submitted."},
    ]
    with ScriptedProvider(script, api_key=KEY) as up:
        policy = _policy_yaml(tmp_path, up, extra)
        # The gateway's allowlist is the check; a tool outside it fails the request.
        text = Path(policy).read_text().replace(
            f"  models: {{default: {MODEL}}}",
            f"  models: {{default: {MODEL}}}\n  tools: {json.dumps(allowed)}")
        Path(policy).write_text(text)
        r = _codex(airlock, policy, workspace)
    assert r.code == 0, (r.stdout[-3000:], r.stderr[-3000:])
    gens = up.generation_requests()
    assert len(gens) == 2
    for req in gens:
        assert _tools(req) == BUILTIN_TOOLS | MCP_BUILTINS | {f"{MCP_NS}__submit_result"}
        assert not any(t.get("type") in ("web_search", "tool_search", "image_generation")
                       for t in req.body["tools"])
    events = r.events()
    assert not [e for e in events if e["type"] == "provider.refused"
                and e["data"]["path"] == "/v1/responses"]
    mcp = [e for e in events if e["type"] == "mcp.call"]
    assert len(mcp) == 1 and mcp[0]["data"]["tool"] == "submit_result" and mcp[0]["data"]["ok"]
    call = _completed(events, "agent.mcp_call")
    assert len(call) == 1 and call[0]["data"]["ok"] is True
    assert r.report["result"] == "forty-two"


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
def test_hosted_web_search_is_refused_by_the_gateway(tmp_path, workspace, monkeypatch):
    """Even a Codex told to search the web (a test-only override of the generated config)
    cannot: the gateway refuses the request that offers the hosted tool."""
    monkeypatch.setenv(KEY_ENV, KEY)
    with ScriptedProvider([{"text": "never served"}], api_key=KEY) as up:
        policy = policy_from_dict({
            "filesystem": {"workspace": "copy"},
            "provider": {"backend": "openai", "base_url": up.url + "/v1",
                         "api_key_env": KEY_ENV, "models": {"default": MODEL}}})
        result = run(RunOptions(policy=policy, agent=CodexAgent({"web_search": "live"}),
                                task=["Search the web"], workspace=workspace,
                                runs_dir=tmp_path / "runs", host_addresses=host_addresses()))
    assert result.exit_code == 1 and result.status == "failed"
    assert up.generation_requests() == []  # nothing reached the provider
    events = [json.loads(line) for line in
              (result.run_dir / "events.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["type"] == "provider.refused"
               and e["data"]["path"] == "/v1/responses"]
    assert refused and all(e["data"]["reason"] == "hosted_tool" and
                           e["data"]["tool"] == "web_search" for e in refused)
    assert any(e["type"] == "agent.turn.failed" for e in events)


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
def test_step_budget_stops_a_codex_run_that_keeps_acting(airlock, tmp_path, workspace):
    # A model that never stops: a command, a patch, an MCP call, again and again.
    script = [
        {"tool": "exec_command", "arguments": {"cmd": "echo again >> hello.txt"}},
        {"tool": "apply_patch", "input": "*** Begin Patch\n*** Add File: more.txt\n+x\n"
                                         "*** End Patch\n"},
        {"tool": "submit_result", "namespace": MCP_NS, "arguments": {"result": "partial"}},
    ]
    with ScriptedProvider(script, api_key=KEY, loop=True) as up:
        policy = _policy_yaml(tmp_path, up, "mcp: {builtin: [submit_result]}\n"
                                            "budgets: {steps: 4}")
        r = _codex(airlock, policy, workspace)
    assert r.code == 4, (r.stdout[-3000:], r.stderr[-3000:])
    report = r.report
    assert report["status"] == "budget_exceeded" and report["exit_reason"] == "budget"
    events = r.events()
    budget = [e for e in events if e["type"] == "budget.exceeded"]
    assert len(budget) == 1 and budget[0]["data"]["counter"] == "steps"
    assert budget[0]["data"]["limit"] == 4 and budget[0]["data"]["used"] == 5
    steps = [e for e in events if e["source"] == "agent" and "step" in e["data"]]
    assert [e["data"]["step"] for e in steps][:5] == [1, 2, 3, 4, 5]
    # Commands, file changes and MCP calls all counted.
    assert {e["type"] for e in steps[:5]} == {"agent.command", "agent.file_change",
                                              "agent.mcp_call"}
    # The run was stopped, not finished: the model was still being asked for more.
    assert not any(e["type"] == "agent.turn.completed" for e in events)
    assert len(up.generation_requests()) <= 7


@pytest.mark.slow
def test_feature_keys_exist_in_the_pinned_codex(engine, codex_image):
    """Every feature the generated config names is one this Codex has, and none of them is
    removed (a removed key is accepted and silently does nothing)."""
    from runner.agents.codex_config import FEATURES_OFF, FEATURES_ON

    out = engine.containers.run(
        codex_image, ["sh", "-c", "mkdir -p /tmp/h && codex features list"],
        environment={"CODEX_HOME": "/tmp/h", "HOME": "/tmp"}, network_mode="none",
        remove=True, stderr=False).decode()
    stages = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    for name in (*FEATURES_OFF, *FEATURES_ON):
        assert name in stages, f"{name} is not a feature of Codex {CODEX_VERSION}"
        assert stages[name] != "removed", f"{name} was removed in Codex {CODEX_VERSION}"


@pytest.mark.slow
@pytest.mark.usefixtures("codex_image")
def test_a_stale_config_key_fails_the_run_loudly(tmp_path, workspace, monkeypatch):
    """`--strict-config`: a key this Codex does not know is an error, not silently ignored."""
    monkeypatch.setenv(KEY_ENV, KEY)
    output: list[bytes] = []
    with ScriptedProvider([{"text": "never served"}], api_key=KEY) as up:
        policy = policy_from_dict({
            "provider": {"backend": "openai", "base_url": up.url + "/v1",
                         "api_key_env": KEY_ENV, "models": {"default": MODEL}}})
        result = run(RunOptions(
            policy=policy, agent=CodexAgent({"features": {"no_such_feature_key": True},
                                             "no_such_key": 1}),
            task=["hello"], workspace=workspace, runs_dir=tmp_path / "runs",
            on_output=lambda stream, chunk: output.append(chunk)))
    assert result.exit_code == 1 and result.status == "failed"
    assert up.generation_requests() == []
    text = b"".join(output).decode()
    assert "no_such" in text and "config" in text.lower(), text
