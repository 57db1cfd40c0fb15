"""The run's MCP server, host side (no Docker): a real MCP client over the unix socket.

The client sends Host 127.0.0.1:<port>, as an agent behind the in-sandbox shim does.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from runner.errors import NotReady
from runner.events import BudgetExceeded, Budgets, Event, EventLog
from runner.mcp import RunMcpServer, ToolSpecError, resolve_callable
from runner.mcp.audit import ARGUMENTS_CAP, REDACTED, logged_arguments
from runner.policy.models import McpPolicy, McpServerPolicy

pytestmark = pytest.mark.anyio

UPSTREAM = Path(__file__).with_name("test_mcp_upstream_server.py")
UPSTREAM_CMD = f"{shlex.quote(sys.executable)} {shlex.quote(str(UPSTREAM))}"
SANDBOX_URL = "http://127.0.0.1:41003/mcp"  # what the agent uses inside the sandbox


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- tools the tests expose ------------------------------------------------------------------


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def shout(text: str) -> str:
    """Upper-case the text (named in the policy as a module:function entry)."""
    return text.upper()


def broken(path: str) -> str:
    """A host tool that fails with a message the agent must not see."""
    raise OSError(f"cannot open /srv/secret-host-path/{path}")


# -- harness -----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.log = EventLog(None, "run-test")
        self.events: list[Event] = []
        self.log.subscribe(self.events.append)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == type_]


@asynccontextmanager
async def serving(
    tmp_path: Path,
    policy: McpPolicy,
    *,
    name: str = "mcp.sock",
    token: str = "token-of-run-a",
    budgets: Budgets | None = None,
    python_tools: list[Callable[..., Any]] | None = None,
    recorder: Recorder | None = None,
) -> AsyncIterator[tuple[RunMcpServer, Recorder]]:
    rec = recorder or Recorder()
    server = RunMcpServer(
        policy, tmp_path / name, token, rec.log, budgets or Budgets({}, rec.log),
        python_tools=python_tools or [], upstream_log=tmp_path / f"{name}.upstream.log",
    )
    await server.start()
    try:
        yield server, rec
    finally:
        await server.aclose()


@asynccontextmanager
async def agent(socket: Path, token: str, mode: str = "legacy") -> AsyncIterator[Client]:
    """An MCP client as inside the sandbox: Streamable HTTP with the run's bearer token."""
    http = httpx2.AsyncClient(
        transport=httpx2.AsyncHTTPTransport(uds=str(socket)),
        headers={"Authorization": f"Bearer {token}"},
    )
    async with http, Client(streamable_http_client(SANDBOX_URL, http_client=http),
                            mode=mode) as client:
        yield client


def raw(socket: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket)),
                             base_url="http://127.0.0.1:41003")


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "raw", "version": "0"}}}
JSON_HEADERS = {"Accept": "application/json, text/event-stream",
                "Content-Type": "application/json"}


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


def pids_running(marker: str) -> set[int]:
    """Processes whose command line contains `marker`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def http_upstream() -> Iterator[int]:
    """The fixture upstream serving Streamable HTTP on loopback; yields its port."""
    proc = subprocess.Popen([sys.executable, str(UPSTREAM), "--http"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


def stdio(command: str, *enabled: str) -> McpServerPolicy:
    return McpServerPolicy.model_validate({"command": command, "enabled_tools": list(enabled)})


# The module's import name depends on how pytest imports tests; the entry follows it.
SHOUT_ENTRY = f"{__name__}:shout"
FULL_POLICY = McpPolicy(
    tools=[SHOUT_ENTRY],
    builtin=["submit_result"],
    servers=[stdio(UPSTREAM_CMD, "echo", "explode")],
)


# -- exposure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # the 2025 handshake and 2026 envelope
async def test_lists_exactly_the_run_tools_and_calls_them(tmp_path: Path, mode: str) -> None:
    async with serving(tmp_path, FULL_POLICY, python_tools=[add]) as (server, rec):
        expected = {"add", "shout", "submit_result", "echo", "explode"}
        assert set(server.tool_names) == expected
        sock = server.socket_path
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666

        async with agent(sock, "token-of-run-a", mode) as client:
            listed = (await client.list_tools()).tools
            assert {t.name for t in listed} == expected
            schema = next(t for t in listed if t.name == "add").input_schema
            assert set(schema["properties"]) == {"a", "b"}

            assert text_of(await client.call_tool("add", {"a": 2, "b": 3})) == "5"
            assert text_of(await client.call_tool("shout", {"text": "hi"})) == "HI"
            assert text_of(await client.call_tool("echo", {"text": "yo"})) == "upstream says yo"
            assert server.result is None
            await client.call_tool("submit_result", {"result": "the answer"})
            assert server.result == "the answer"

            # Not exposed: the upstream's disabled tool and a made-up name, both by name.
            for name in ("admin_reset", "rm_rf"):
                with pytest.raises(MCPError, match="Unknown tool"):
                    await client.call_tool(name, {})

        calls = rec.of("mcp.call")
        assert [c["tool"] for c in calls] == ["add", "shout", "echo", "submit_result"]
        for call in calls:
            assert call["ok"] is True and call["error"] is None
            assert call["duration_ms"] >= 0 and call["result_bytes"] > 0
        assert calls[0]["arguments"] == {"a": 2, "b": 3}
        assert calls[2]["origin"].startswith("upstream:")
        refused = rec.of("mcp.refused")
        assert [(r["tool"], r["reason"]) for r in refused] == [
            ("admin_reset", "not_exposed"), ("rm_rf", "not_exposed")]
        (up,) = rec.of("mcp.upstream")
        assert up["exposed"] == ["echo", "explode"] and up["hidden"] == ["admin_reset"]
    (stopped,) = rec.of("mcp.stopped")
    assert stopped["calls"] == 4 and stopped["refused"] == 2 and stopped["result_submitted"]
    assert not sock.exists()


async def test_upstream_tool_that_raises_is_an_error_event_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path, FULL_POLICY) as (server, rec):
        async with agent(server.socket_path, "token-of-run-a") as client:
            failed = await client.call_tool("explode", {"reason": "boom"})
            assert failed.is_error
            still = await client.call_tool("echo", {"text": "still"})
            assert text_of(still) == "upstream says still"
        explode, echo = rec.of("mcp.call")
        assert explode["tool"] == "explode" and explode["ok"] is False and explode["error"]
        assert explode["duration_ms"] >= 0
        assert echo["ok"] is True


async def test_python_tool_that_raises_hides_its_message_from_the_agent(tmp_path: Path) -> None:
    async with serving(tmp_path, McpPolicy(), python_tools=[broken, add]) as (server, rec):
        async with agent(server.socket_path, "token-of-run-a") as client:
            result = await client.call_tool("broken", {"path": "x"})
            assert result.is_error
            assert "secret-host-path" not in text_of(result) and "OSError" in text_of(result)
            bad_args = await client.call_tool("add", {"a": "not a number", "b": 1})
            assert bad_args.is_error and "invalid arguments" in text_of(bad_args)
            assert text_of(await client.call_tool("add", {"a": 1, "b": 1})) == "2"
        broken_call, bad_call, ok_call = rec.of("mcp.call")
        assert "secret-host-path" in broken_call["error"]  # the host's log has it all
        assert bad_call["ok"] is False and ok_call["ok"] is True


async def test_upstream_stops_with_the_server(tmp_path: Path) -> None:
    marker = f"mcp-upstream-{os.getpid()}-{tmp_path.name}"  # the fixture ignores extra words
    policy = McpPolicy(servers=[stdio(f"{UPSTREAM_CMD} {marker}", "echo")])
    async with serving(tmp_path, policy):
        assert len(pids_running(marker)) == 1
    assert not pids_running(marker)


async def test_upstream_reached_by_url_is_filtered_too(tmp_path: Path, http_upstream: int) -> None:
    # Userinfo and query are where a URL carries credentials: they stay out of the log.
    url = f"http://user:pw@127.0.0.1:{http_upstream}/mcp?key=sekrit"
    policy = McpPolicy(servers=[McpServerPolicy.model_validate(
        {"url": url, "enabled_tools": ["echo"]})])
    async with serving(tmp_path, policy) as (server, rec), \
            agent(server.socket_path, "token-of-run-a") as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["echo"]
        assert text_of(await client.call_tool("echo", {"text": "web"})) == "upstream says web"
        with pytest.raises(MCPError, match="Unknown tool"):
            await client.call_tool("explode", {"reason": "not enabled"})
    (up,) = rec.of("mcp.upstream")
    assert up["server"] == f"http://127.0.0.1:{http_upstream}/mcp"
    assert up["hidden"] == ["admin_reset", "explode"]
    assert "sekrit" not in str([e.data for e in rec.events])


async def test_an_upstream_that_never_answers_times_out_and_is_stopped(tmp_path: Path) -> None:
    marker = f"mcp-silent-{os.getpid()}"
    silent = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)' {marker}"
    server = RunMcpServer(McpPolicy(servers=[stdio(silent, "x")]), tmp_path / "mcp.sock",
                          "token-of-run-a", Recorder().log, Budgets({}), start_timeout=1.0)
    with pytest.raises(NotReady, match="did not start within 1s"):
        await server.start()
    assert not pids_running(marker)
    assert not (tmp_path / "mcp.sock").exists()


async def test_closing_ends_calls_in_flight_and_records_them(tmp_path: Path) -> None:
    entered = anyio.Event()

    async def hang() -> str:
        """Never returns by itself."""
        entered.set()
        await anyio.sleep(3600)
        return "never"

    rec = Recorder()
    server = RunMcpServer(McpPolicy(), tmp_path / "mcp.sock", "token-of-run-a", rec.log,
                          Budgets({}, rec.log), python_tools=[hang])
    await server.start()
    async with agent(server.socket_path, "token-of-run-a") as client, \
            anyio.create_task_group() as tg:

        async def call() -> None:
            with pytest.raises(MCPError):
                await client.call_tool("hang", {})

        tg.start_soon(call)
        await entered.wait()
        with anyio.fail_after(5):
            await server.aclose()
    (record,) = rec.of("mcp.call")
    assert record["tool"] == "hang" and record["ok"] is False and record["error"] == "cancelled"
    assert rec.of("mcp.stopped")


# -- limits ------------------------------------------------------------------------------------


async def test_per_tool_cap_refuses_with_an_event(tmp_path: Path) -> None:
    policy = McpPolicy(per_tool_calls={"add": 2})
    async with serving(tmp_path, policy, python_tools=[add, shout]) as (server, rec):
        async with agent(server.socket_path, "token-of-run-a") as client:
            for _ in range(2):
                assert not (await client.call_tool("add", {"a": 1, "b": 1})).is_error
            capped = await client.call_tool("add", {"a": 1, "b": 1})
            assert capped.is_error and "at most 2" in text_of(capped)
            assert not (await client.call_tool("shout", {"text": "other tools go on"})).is_error
        assert [c["tool"] for c in rec.of("mcp.call")] == ["add", "add", "shout"]
        (refused,) = rec.of("mcp.refused")
        assert refused == refused | {"tool": "add", "reason": "per_tool_cap", "limit": 2}


async def test_mcp_calls_budget_trips_once_and_refuses_further_calls(tmp_path: Path) -> None:
    rec = Recorder()
    tripped: list[BudgetExceeded] = []
    budgets = Budgets({"mcp_calls": 2}, rec.log, on_exceeded=tripped.append)
    async with serving(tmp_path, McpPolicy(), python_tools=[add], budgets=budgets,
                       recorder=rec) as (server, _), \
            agent(server.socket_path, "token-of-run-a") as client:
        for _ in range(2):
            assert not (await client.call_tool("add", {"a": 1, "b": 1})).is_error
        for _ in range(2):
            refused = await client.call_tool("add", {"a": 1, "b": 1})
            assert refused.is_error and "budget" in text_of(refused)
    assert len(tripped) == 1 and tripped[0].counter == "mcp_calls"
    assert budgets.charge("mcp_calls") is False
    (exceeded,) = rec.of("budget.exceeded")
    assert exceeded == {"counter": "mcp_calls", "used": 3, "limit": 2}
    assert [e.source for e in rec.events if e.type == "budget.exceeded"] == ["mcp"]
    assert len(rec.of("mcp.call")) == 2
    assert [r["reason"] for r in rec.of("mcp.refused")] == ["budget", "budget"]


# -- the token and the boundary ---------------------------------------------------------------


async def test_requests_without_the_run_token_get_401_and_an_event(tmp_path: Path) -> None:
    async with serving(tmp_path, McpPolicy(), python_tools=[add]) as (server, rec):
        async with raw(server.socket_path) as http:
            no_token = await http.post("/mcp", json=INIT, headers=JSON_HEADERS)
            wrong = await http.post("/mcp", json=INIT, headers=JSON_HEADERS | {
                "Authorization": "Bearer token-of-run-b"})
            not_bearer = await http.post("/mcp", json=INIT, headers=JSON_HEADERS | {
                "Authorization": "Basic dG9rZW4tb2YtcnVuLWE="})
            elsewhere = await http.get("/admin")
            good = await http.post("/mcp", json=INIT, headers=JSON_HEADERS | {
                "Authorization": "Bearer token-of-run-a"})
            # Right token, but a Host that is not loopback: DNS rebinding is still refused.
            rebound = await http.post("/mcp", json=INIT, headers=JSON_HEADERS | {
                "Authorization": "Bearer token-of-run-a", "Host": "evil.example:41003"})
        assert [r.status_code for r in (no_token, wrong, not_bearer, elsewhere)] == [401] * 4
        assert no_token.headers["www-authenticate"].startswith("Bearer")
        assert good.status_code == 200
        assert rebound.status_code == 421
        assert [(u["reason"], u["method"], u["path"]) for u in rec.of("mcp.unauthorized")] == [
            ("missing", "POST", "/mcp"), ("invalid", "POST", "/mcp"),
            ("invalid", "POST", "/mcp"), ("missing", "GET", "/admin")]
        assert "token-of-run-b" not in str(rec.of("mcp.unauthorized"))


async def test_two_runs_have_independent_servers(tmp_path: Path) -> None:
    policy = McpPolicy(builtin=["submit_result"])
    async with (
        serving(tmp_path, policy, name="a.sock", token="token-of-run-a",
                python_tools=[add]) as (a, rec_a),
        serving(tmp_path, policy, name="b.sock", token="token-of-run-b",
                python_tools=[shout]) as (b, rec_b),
    ):
        assert set(a.tool_names) == {"add", "submit_result"}
        assert set(b.tool_names) == {"shout", "submit_result"}
        # Run B's token does not open run A's server, nor the other way round.
        async with raw(a.socket_path) as http:
            r = await http.post("/mcp", json=INIT, headers=JSON_HEADERS | {
                "Authorization": "Bearer token-of-run-b"})
            assert r.status_code == 401
        async with raw(b.socket_path) as http:
            r = await http.post("/mcp", json=INIT, headers=JSON_HEADERS | {
                "Authorization": "Bearer token-of-run-a"})
            assert r.status_code == 401
        async with agent(a.socket_path, "token-of-run-a") as client:
            await client.call_tool("submit_result", {"result": "from a"})
            with pytest.raises(MCPError):
                await client.call_tool("shout", {"text": "b's tool"})
        async with agent(b.socket_path, "token-of-run-b") as client:
            assert text_of(await client.call_tool("shout", {"text": "b"})) == "B"
        assert (a.result, b.result) == ("from a", None)
        assert len(rec_a.of("mcp.unauthorized")) == 1 and len(rec_b.of("mcp.unauthorized")) == 1
        assert [c["tool"] for c in rec_a.of("mcp.call")] == ["submit_result"]
        assert [c["tool"] for c in rec_b.of("mcp.call")] == ["shout"]


# -- arguments in the log ---------------------------------------------------------------------


async def test_logged_arguments_are_redacted_and_capped(tmp_path: Path) -> None:
    def store(note: str, api_key: str, options: dict[str, str]) -> str:
        """Keep a note."""
        return "stored"

    async with serving(tmp_path, McpPolicy(), python_tools=[store]) as (server, rec), \
            agent(server.socket_path, "token-of-run-a") as client:
        await client.call_tool("store", {"note": "short", "api_key": "sk-live-123",
                                         "options": {"Password": "hunter2", "mode": "x"}})
        await client.call_tool("store", {"note": "n" * 10_000, "api_key": "sk-live-456",
                                         "options": {}})
    small, big = rec.of("mcp.call")
    assert small["arguments"] == {"note": "short", "api_key": REDACTED,
                                  "options": {"Password": REDACTED, "mode": "x"}}
    assert big["arguments_truncated"] is True and big["arguments_bytes"] > 10_000
    assert len(big["arguments"].encode()) <= ARGUMENTS_CAP
    assert "sk-live" not in str(rec.of("mcp.call"))


def test_logged_arguments_redact_nested_lists() -> None:
    fields = logged_arguments({"items": [{"token": "t", "ok": 1}], "authorization": "Bearer x"})
    assert fields["arguments"] == {"items": [{"token": REDACTED, "ok": 1}],
                                   "authorization": REDACTED}


# -- resolving and starting -------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "message"), [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "has no attribute 'no_such_function'"),
    ("json", "expected module:function"),
    ("json:__doc__", "is not callable"),
])
def test_resolve_callable_names_the_entry(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        resolve_callable(entry)
    assert repr(entry) in str(info.value)
    assert isinstance(info.value, ToolSpecError)


def test_resolve_callable_finds_the_function() -> None:
    assert resolve_callable("os.path:join") is os.path.join


async def test_start_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    cases: list[tuple[McpPolicy, type[Exception], str]] = [
        (McpPolicy(tools=["no_such_module_xyz:fn"]), ToolSpecError, "no_such_module_xyz"),
        (McpPolicy(servers=[stdio("/nonexistent/mcp-server")]), NotReady,
         "not available"),
        (McpPolicy(servers=[stdio(UPSTREAM_CMD, "nope")]),
         ToolSpecError, "has no tool nope"),
        (McpPolicy(tools=[f"{__name__}:add"]), ToolSpecError, "two MCP tools"),
    ]
    for policy, error, message in cases:
        rec = Recorder()
        server = RunMcpServer(policy, tmp_path / "x.sock", "token-of-run-a", rec.log,
                              Budgets({}, rec.log), python_tools=[add])
        with pytest.raises(error, match=message):
            await server.start()
        assert not (tmp_path / "x.sock").exists()
        assert not rec.of("mcp.started")
        await server.aclose()  # harmless after a failed start
