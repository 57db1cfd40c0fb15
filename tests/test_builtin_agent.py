"""The builtin agent (runner/sandbox/agent_loop.py) end to end: the real engine, the real
`builtin` image, the real gateway, and a scripted provider on the host that plays the
model, asking the agent's tools to do things, including what must fail.

Reachability is only ever tried against this machine's own addresses (a canary
listener), never an address off it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runner.agents import get_agent
from runner.agents.base import AgentContext
from runner.agents.builtin import BuiltinAgent
from runner.errors import BadInput
from runner.policy.loader import policy_from_dict
from runner.run.hostaddrs import host_addresses
from runner.testing import ScriptedProvider
from tests.conftest import ROOT, Canary, Result, write_policy

KEY_VAR = "AIRLOCK_TEST_BUILTIN_KEY"
KEY = "sk-builtin-real-key-" + "k" * 20
MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-5", "openai-compatible": "gpt-5",
          "ollama": "llama3"}
GENERATION_PATH = {"anthropic": "/v1/messages", "openai": "/v1/responses",
                   "openai-compatible": "/v1/chat/completions", "ollama": "/api/chat"}
# Streamed, except Chat Completions (some compatible servers refuse `stream_options`).
STREAMED = {"anthropic": True, "openai": True, "openai-compatible": False, "ollama": True}

docker_tests = pytest.mark.usefixtures("engine", "builtin_image")


@pytest.fixture(scope="session")
def builtin_image(engine: Any) -> str:
    out = subprocess.run([sys.executable, "-m", "runner.cli", "images", "build", "builtin"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def policy(tmp_path: Path, url: str, backend: str = "anthropic", extra: str = "") -> str:
    base = url + "/v1" if backend in ("openai", "openai-compatible") else url
    return write_policy(tmp_path, f"""\
extends: default
provider:
  backend: {backend}
  base_url: {base}
  api_key_env: {KEY_VAR}
  models: {{default: {MODELS[backend]}}}
{extra}""")


def run(airlock: Any, policy_path: str, *args: str, prompt: str = "do the task") -> Result:
    return airlock("run", "--agent", "builtin", "--policy", policy_path, *args, "--", prompt,
                   env={KEY_VAR: KEY})


def of(r: Result, etype: str) -> list[dict[str, Any]]:
    return [e["data"] for e in r.events() if e["type"] == etype]


def calls(r: Result) -> dict[str, dict[str, Any]]:
    """The completed tool calls by id; every one is an untrusted agent event."""
    out = {}
    for e in r.events():
        if e["type"] == "agent.tool_call":
            assert e["source"] == "agent"
            out[e["data"]["id"]] = e["data"]
    return out


def shell(cid: str, command: str) -> dict[str, Any]:
    return {"tool": "shell", "id": cid, "arguments": {"command": command}}


# -- end to end --------------------------------------------------------------------------------


@docker_tests
@pytest.mark.parametrize("backend", ["anthropic", "openai", "openai-compatible", "ollama"])
def test_a_tool_call_and_a_final_answer(airlock, tmp_path, backend):
    script = [shell("toolu_echo", "echo hello-from-the-sandbox; id -u"),
              {"text": "The sandbox said hello."}]
    with ScriptedProvider(script, api_key=KEY) as up:
        r = run(airlock, policy(tmp_path, up.url, backend))
        gens = up.generation_requests()
    assert r.code == 0, r.stderr
    assert r.report["status"] == "succeeded" and r.report["exit_reason"] == "agent"

    # The loop spoke the backend's own API, with the role resolved to the full model id,
    # offering its three local tools; the upstream got the real key.
    assert [g.path for g in gens] == [GENERATION_PATH[backend]] * 2
    assert all(g.body["model"] == MODELS[backend] for g in gens)
    assert all(bool(g.body.get("stream")) is STREAMED[backend] for g in gens)
    assert sorted(gens[0].tool_names) == ["read_file", "shell", "write_file"]
    auth = [g.header("x-api-key") or g.header("authorization") or "" for g in gens]
    assert all(KEY in a for a in auth), auth
    # The tool's result went back to the model in the second request.
    assert "hello-from-the-sandbox" in json.dumps(gens[1].body)

    [call] = calls(r).values()
    assert call["name"] == "shell" and call["ok"] is True and call["exit_code"] == 0
    assert "hello-from-the-sandbox\n1000" in call["output"]
    final = [m for m in of(r, "agent.message") if m.get("final")]
    assert [m["text"] for m in final] == ["The sandbox said hello."]
    usage = of(r, "agent.usage")
    assert len(usage) == 2 and all(u["input_tokens"] > 0 for u in usage)
    assert of(r, "agent.start")[0]["tools"] == ["shell", "read_file", "write_file"]
    assert of(r, "agent.end")[-1]["status"] == "completed"
    # One tool call and one turn without a tool: two steps, charged by the host.
    assert r.report["budgets"]["steps"]["used"] == 2
    assert r.report["budgets"]["requests"]["used"] == 2
    assert KEY not in (r.run_dir / "events.jsonl").read_text()


@docker_tests
def test_copy_mode_edit_returns_a_patch_and_leaves_the_host_untouched(airlock, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "app.py").write_text("print('helo')\n")
    (ws / "keep.txt").write_text("unchanged\n")
    before = {p.name: p.read_bytes() for p in ws.iterdir()}
    script = [{"tool": "read_file", "id": "toolu_read", "arguments": {"path": "/workspace/app.py"}},
              {"tool": "write_file", "id": "toolu_write",
               "arguments": {"path": "/workspace/app.py", "content": "print('hello')\n"}},
              {"tool": "write_file", "id": "toolu_new",
               "arguments": {"path": "/workspace/docs/NOTES.md", "content": "# notes\n"}},
              shell("toolu_check", "python3 /workspace/app.py && rm /workspace/keep.txt"),
              {"text": "Fixed the typo."}]
    with ScriptedProvider(script, api_key=KEY) as up:
        r = run(airlock, policy(tmp_path, up.url, extra="filesystem: {workspace: copy}"),
                "--workspace", str(ws))
    assert r.code == 0, r.stderr
    c = calls(r)
    assert c["toolu_read"]["ok"] and c["toolu_write"]["ok"] and c["toolu_new"]["ok"]
    assert c["toolu_check"]["ok"] and "hello" in c["toolu_check"]["output"]
    # The agent's view changed; the host's did not, and the change came back as a patch.
    assert {p.name: p.read_bytes() for p in ws.iterdir()} == before
    patch = r.report["patch"]
    assert patch == (r.run_dir / "changes.patch").read_text()
    assert "-print('helo')" in patch and "+print('hello')" in patch
    assert "b/docs/NOTES.md" in patch and "deleted file" in patch
    assert of(r, "workspace.patch")


@docker_tests
def test_escape_attempts_fail_inside_and_the_events_show_each(airlock, tmp_path, canary: Canary):
    secret = "host-only-secret-" + os.urandom(6).hex()
    host_file = tmp_path / "host-secret.txt"
    host_file.write_text(secret)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README").write_text("read me\n")
    hosts = host_addresses()
    assert hosts, "this machine has no non-loopback address to aim the canary test at"
    connect = ("python3 -c 'import socket, sys\n"
               f"port = {canary.port}\n"
               "reached = False\n"
               f"for h in \"{' '.join(hosts)}\".split():\n"
               "    try:\n"
               "        socket.create_connection((h, port), timeout=3).close(); reached = True\n"
               "        print(h, \"CONNECTED\")\n"
               "    except OSError as e:\n"
               "        print(f\"{h} -> {e}\")\n"
               "sys.exit(0 if reached else 1)'")
    script = [
        shell("toolu_write_root", "echo owned > /airlock-escape"),
        shell("toolu_write_etc", "echo 'x::0:0::/:/bin/sh' >> /etc/passwd"),
        {"tool": "write_file", "id": "toolu_tool_etc",
         "arguments": {"path": "/etc/airlock-escape", "content": "x"}},
        {"tool": "write_file", "id": "toolu_tool_ro_ws",
         "arguments": {"path": "/workspace/escape.txt", "content": "x"}},
        shell("toolu_shell_ro_ws", "echo x > /workspace/escape.txt"),
        shell("toolu_host_path", f"cat {host_file}"),
        {"tool": "read_file", "id": "toolu_read_host", "arguments": {"path": str(host_file)}},
        shell("toolu_canary", connect),
        shell("toolu_name", "getent hosts host.docker.internal"),
        {"text": "Nothing worked."},
    ]
    with ScriptedProvider(script, api_key=KEY) as up:
        r = run(airlock, policy(tmp_path, up.url), "--workspace", str(ws))
    assert r.code == 0, r.stderr  # the agent finished: the attempts failed, not the run
    c = calls(r)
    assert set(c) == {s["id"] for s in script if "id" in s}
    for cid, call in c.items():
        assert call["ok"] is False and call["error"], (cid, call)
    # Each failure is the boundary's answer, visible in the event.
    assert "Read-only file system" in c["toolu_write_root"]["output"] \
        or "Permission denied" in c["toolu_write_root"]["output"]
    assert c["toolu_write_etc"]["exit_code"] != 0
    assert "outside the writable paths" in c["toolu_tool_etc"]["error"]
    assert "outside the writable paths" in c["toolu_tool_ro_ws"]["error"]
    assert "Read-only file system" in c["toolu_shell_ro_ws"]["output"]
    assert "No such file or directory" in c["toolu_host_path"]["output"]
    assert c["toolu_read_host"]["error"].startswith("ENOENT")
    assert c["toolu_canary"]["output"].count(" -> ") == len(hosts)
    assert "CONNECTED" not in c["toolu_canary"]["output"]
    assert c["toolu_name"]["exit_code"] == 2  # getent: not found (there is no DNS at all)
    # Each attempt was announced before it ran, and each counted as a step.
    starts = [d["id"] for d in of(r, "agent.tool_start")]
    assert starts == [s["id"] for s in script if "id" in s]
    assert r.report["budgets"]["steps"]["used"] == len(c) + 1
    # And on the host: nothing reached the canary, nothing of the secret left the host,
    # the workspace is as it was.
    assert canary.hits == []
    assert secret not in (r.run_dir / "events.jsonl").read_text()
    assert sorted(p.name for p in ws.iterdir()) == ["README"]


@docker_tests
def test_the_step_budget_ends_the_run_with_exit_4(airlock, tmp_path):
    with ScriptedProvider([shell("", "echo again")], api_key=KEY, loop=True) as up:
        r = run(airlock, policy(tmp_path, up.url, extra="budgets: {steps: 3}"))
    assert r.code == 4, r.stderr
    assert r.report["status"] == "budget_exceeded"
    [trip] = of(r, "budget.exceeded")
    assert trip["counter"] == "steps" and trip["limit"] == 3 and trip["used"] == 4
    assert 4 <= len(of(r, "agent.tool_call")) <= 5


@docker_tests
def test_the_runs_mcp_tools_are_offered_and_called(airlock, tmp_path):
    script = [{"tool": "submit_result", "id": "toolu_submit",
               "arguments": {"result": "forty-two"}},
              {"text": "Submitted."}]
    with ScriptedProvider(script, api_key=KEY) as up:
        r = run(airlock, policy(tmp_path, up.url, extra="mcp: {builtin: [submit_result]}"))
        offered = up.generation_requests()[0].tool_names
    assert r.code == 0, r.stderr
    assert sorted(offered) == ["read_file", "shell", "submit_result", "write_file"]
    assert calls(r)["toolu_submit"]["ok"] is True
    [mcp_call] = of(r, "mcp.call")
    assert mcp_call["tool"] == "submit_result" and mcp_call["ok"]
    assert r.report["result"] == "forty-two"


@docker_tests
def test_a_gateway_refusal_is_an_agent_error(airlock, tmp_path):
    # The policy allows only the shell tool: a request that offers more never leaves.
    with ScriptedProvider(["never served"], api_key=KEY) as up:
        r = run(airlock, policy(tmp_path, up.url, extra="  tools: [shell]"))
        assert up.generation_requests() == []
    assert r.code == 1, r.stderr
    assert r.report["status"] == "failed"
    [refusal] = of(r, "provider.refused")
    assert "read_file" in json.dumps(refusal)
    [err] = of(r, "agent.error")
    assert err["where"] == "provider" and err["status"] == 403


@docker_tests
def test_an_upstream_error_is_an_agent_error(airlock, tmp_path):
    with ScriptedProvider([{"error": {"status": 400, "message": "bad request from upstream"}}],
                          api_key=KEY) as up:
        r = run(airlock, policy(tmp_path, up.url))
        assert len(up.generation_requests()) == 1
    assert r.code == 1, r.stderr
    [err] = of(r, "agent.error")
    assert err["where"] == "provider" and err["status"] == 400
    assert "bad request from upstream" in err["error"]
    assert of(r, "agent.end")[-1]["status"] == "error"


@docker_tests
def test_make_demo_runs_green(runs_dir):
    proc = subprocess.run([sys.executable, "-m", "runner.demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "AIRLOCK_RUNS_DIR": str(runs_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Every escape attempt failed (8 of 8)" in proc.stdout
    assert "ESCAPED" not in proc.stdout


# -- the adapter, without the engine ----------------------------------------------------------


def ctx(data: dict[str, Any], workspace: str | None = None, model: str | None = None,
        task: list[str] | None = None) -> AgentContext:
    return AgentContext(policy=policy_from_dict(data), task=task or ["fix", "it"], model=model,
                        workspace=workspace)


PROVIDER = {"backend": "anthropic", "base_url": "http://127.0.0.1:9", "api_key_env": "K",
            "models": {"default": "claude-sonnet-4-5"}}


def test_argv_names_the_api_the_model_the_writable_paths_and_the_safety_net():
    agent = get_agent("builtin")
    assert isinstance(agent, BuiltinAgent) and agent.image == "builtin"
    argv = agent.argv(ctx({"provider": PROVIDER, "budgets": {"steps": 7},
                           "filesystem": {"workspace": "copy"}}, "/workspace",
                          "claude-sonnet-4-5"))
    assert argv[:3] == ["python3", "-I", "/opt/airlock/airlock_sandbox/agent_loop.py"]
    assert argv[-2:] == ["--", "fix it"]
    opts = dict(zip(argv[3:-2:2], argv[4:-2:2], strict=False))
    assert opts["--api"] == "anthropic" and opts["--model"] == "claude-sonnet-4-5"
    assert opts["--max-steps"] == "8"  # one past the host's budget: the host stops it first
    writable = [argv[i + 1] for i, a in enumerate(argv) if a == "--writable"]
    assert writable == ["/workspace", "/home/airlock", "/tmp"]
    # A read-only workspace is not offered for writing.
    ro = agent.argv(ctx({"provider": PROVIDER}, "/workspace"))
    assert "/workspace" not in [ro[i + 1] for i, a in enumerate(ro) if a == "--writable"]


@pytest.mark.parametrize(("backend", "api"), [("anthropic", "anthropic"), ("vertex", "anthropic"),
                                              ("gateway", "anthropic"), ("openai", "responses"),
                                              ("openai-compatible", "chat"),
                                              ("ollama", "ollama")])
def test_the_api_follows_the_backend(backend, api):
    provider = {**PROVIDER, "backend": backend}
    if backend == "vertex":
        provider.update(project="p", region="us-east5")
    argv = BuiltinAgent().argv(ctx({"provider": provider}))
    assert argv[argv.index("--api") + 1] == api


def test_replay_speaks_the_recorded_api():
    provider = {"backend": "replay",
                "replay_file": str(ROOT / "runner" / "data" / "demo" / "recording.jsonl"),
                "models": {"default": "claude-sonnet-4-5"}}
    argv = BuiltinAgent().argv(ctx({"provider": provider}))
    assert argv[argv.index("--api") + 1] == "anthropic"


def test_no_provider_or_no_prompt_is_bad_input():
    with pytest.raises(BadInput, match="needs a model provider"):
        BuiltinAgent().argv(ctx({}))
    with pytest.raises(BadInput, match="needs a prompt"):
        BuiltinAgent().argv(ctx({"provider": PROVIDER}, task=[" "]))


def line(type_: str, **data: Any) -> str:
    return json.dumps({"airlock_agent": 1, "type": type_, **data})


def test_parse_line_maps_types_and_marks_steps():
    a = BuiltinAgent()
    [start] = a.parse_line("stdout", line("start", api="anthropic", tools=["shell"]))
    assert start.type == "agent.start" and not start.step
    [usage] = a.parse_line("stdout", line("turn", turn=1, usage={"input_tokens": 5,
                                                                  "output_tokens": 2}))
    assert usage.type == "agent.usage" and usage.data["input_tokens"] == 5
    assert usage.data["cache_read_tokens"] == 0 and "usage" not in usage.data
    [ts] = a.parse_line("stdout", line("tool_start", id="1", name="shell"))
    assert ts.type == "agent.tool_start" and not ts.step
    [tc] = a.parse_line("stdout", line("tool_call", id="1", name="shell", ok=False))
    assert tc.type == "agent.tool_call" and tc.step
    [note] = a.parse_line("stdout", line("message", text="thinking", final=False))
    assert note.type == "agent.message" and not note.step
    [answer] = a.parse_line("stdout", line("message", text="done", final=True))
    assert answer.step
    [err] = a.parse_line("stdout", line("error", where="provider", error="x"))
    assert err.type == "agent.error"
    assert not a.succeeded(0)  # no `end` yet
    [end] = a.parse_line("stdout", line("end", status="completed"))
    assert end.type == "agent.end" and a.succeeded(0) and not a.succeeded(1)


def test_parse_line_takes_nothing_it_should_not():
    a = BuiltinAgent()
    assert a.parse_line("stderr", line("tool_call", id="1")) == []  # logs are not events
    assert a.parse_line("stdout", "plain text") == []
    assert a.parse_line("stdout", "{not json") == []
    assert a.parse_line("stdout", json.dumps({"type": "tool_call"})) == []  # not the loop's
    assert a.parse_line("stdout", json.dumps([1, 2])) == []
    # Envelope keys cannot be forged, unknown types are kept but labelled, sizes capped.
    [ev] = a.parse_line("stdout", line("tool_call", source="host", seq=1, prev="x", run_id="r",
                                       output="y" * 100_000, nested={"k": "v" * 100_000}))
    assert not {"source", "seq", "prev", "run_id", "type", "airlock_agent"} & set(ev.data)
    assert len(ev.data["output"]) < 5000 and len(ev.data["nested"]) < 9000
    [unknown] = a.parse_line("stdout", line("budget.exceeded", counter="steps"))
    assert unknown.type == "agent.unknown" and unknown.data["kind"] == "budget.exceeded"
    assert not unknown.step
    a.parse_line("stdout", line("end", status="error"))
    assert not a.succeeded(0)
