"""The run's MCP server as an agent inside the sandbox sees it: only the run's tools,
every call on the record, budgets enforced, and no reaching another run's server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import AIRLOCK, PROBES, ROOT, write_policy

pytestmark = pytest.mark.usefixtures("engine")
UPSTREAM = f"{sys.executable} {ROOT}/tests/test_mcp_upstream_server.py"


def mcp_run(airlock, *client_args: str, extra: tuple[str, ...] = (), policy: str = "default"):
    return airlock("run", "--quiet", "--policy", policy, "--workspace", str(PROBES),
                   "--mcp-tool", "tests.mcp_tools:add", "--mcp-tool", "tests.mcp_tools:shout",
                   "--mcp-server", UPSTREAM, "--enable-tool", "echo", "--enable-tool", "explode",
                   *extra, "--", "python3", "/workspace/mcp_client.py", *client_args)


def test_client_inside_lists_exactly_the_runs_tools(airlock):
    r = mcp_run(airlock, "list")
    assert r.code == 0, r.stderr
    out = r.probe()
    assert out["url"] == "http://127.0.0.1:41003/mcp"
    assert out["tools"] == ["add", "echo", "explode", "shout"]  # admin_reset stays hidden


def test_calls_are_events_and_a_raising_tool_does_not_end_the_run(airlock):
    r = mcp_run(airlock, "call", "add", '{"a": 2, "b": 3}', "explode", '{"reason": "boom"}',
                "echo", '{"text": "hi"}', "admin_reset", "{}")
    assert r.code == 0, r.stderr
    calls = r.probe()["calls"]
    assert calls[0]["text"] == "5" and not calls[0]["is_error"]
    assert calls[1]["is_error"]
    assert calls[2]["text"] == "upstream says hi"
    assert calls[3].get("rpc_error") or calls[3].get("is_error")  # not exposed: cannot be called
    events = r.events()
    mcp_calls = [e for e in events if e["type"] == "mcp.call"]
    assert [e["data"]["tool"] for e in mcp_calls] == ["add", "explode", "echo"]
    assert all(e["source"] == "mcp" and "duration_ms" in e["data"] for e in mcp_calls)
    assert mcp_calls[0]["data"]["ok"] and not mcp_calls[1]["data"]["ok"]
    assert any(e["type"] == "mcp.refused" and e["data"]["tool"] == "admin_reset" for e in events)


def test_call_cap_ends_the_run_with_exit_4(airlock, tmp_path):
    policy = write_policy(tmp_path, "extends: default\nbudgets: {mcp_calls: 2}\n")
    r = mcp_run(airlock, "call", "add", '{"a":1,"b":1}', "add", '{"a":1,"b":2}',
                "add", '{"a":1,"b":3}', "add", '{"a":1,"b":4}', policy=policy)
    assert r.code == 4, (r.stdout, r.stderr)
    assert r.report["status"] == "budget_exceeded"
    budget = [e for e in r.events() if e["type"] == "budget.exceeded"]
    assert budget and budget[0]["data"]["counter"] == "mcp_calls"


def test_request_without_the_token_is_refused(airlock):
    r = mcp_run(airlock, "notoken")
    out = r.probe()
    assert out["none"] == 401 and out["wrong"] == 401
    assert any(e["type"] == "mcp.unauthorized" for e in r.events())


def test_a_second_run_cannot_reach_the_first_runs_server(airlock, runs_dir, tmp_path):
    # Run A stays up; run B looks for A's socket and A's port from its own sandbox.
    a = subprocess.Popen([*AIRLOCK, "run", "--quiet", "--mcp-tool", "tests.mcp_tools:add",
                          "--", "sleep", "120"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "AIRLOCK_RUNS_DIR": str(tmp_path)})
    try:
        time.sleep(3)
        r = airlock("run", "--quiet", "--", "python3", "-c", (
            "import glob, json, socket\n"
            "socks = glob.glob('/run/airlock/*') + glob.glob('/tmp/airlock-run-*')\n"
            "s = socket.socket(); s.settimeout(2)\n"
            "try:\n    s.connect(('127.0.0.1', 41003)); port = 'connected'\n"
            "except OSError as e:\n    port = e.errno\n"
            "print(json.dumps({'visible': socks, 'port': port}))"))
        out = r.probe()
        assert not any("mcp" in p for p in out["visible"]), out
        assert out["port"] != "connected"
    finally:
        a.send_signal(signal.SIGINT)  # a clean end: run A removes its own sandbox
        assert a.wait(timeout=30) == 130
