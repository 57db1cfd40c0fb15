"""The provider gateway on the host: no Docker needed.

Clients talk to the gateway's unix socket, as the in-sandbox shim does; the official
SDKs use an httpx client with a uds transport. The upstream is the scripted provider,
speaking the real wire protocols.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from runner.events.budgets import BudgetExceeded, Budgets
from runner.events.limits import HostLimits
from runner.events.log import Event, EventLog
from runner.gateway import PLACEHOLDER_KEY, CredentialError, ProviderGateway
from runner.policy.models import ProviderPolicy
from runner.testing import LoopThread, ScriptedProvider
from tests.conftest import wait_for

KEY = "sk-real-key-0123456789abcdef"
BASE = "http://127.0.0.1:8011"  # what the agent inside would use; the uds decides


class Harness:
    """A gateway on its own loop thread, its events, and clients for its socket."""

    def __init__(self, loop: LoopThread, sockdir: Path, provider: ProviderPolicy, *,
                 budgets: dict[str, int | None] | None = None, record: Path | None = None,
                 environ: dict[str, str] | None = None, name: str = "gw",
                 limits: Any = None) -> None:
        self.events: list[Event] = []
        self.log = EventLog(None, f"run-{name}")
        self.log.subscribe(self.events.append)
        self.tripped: list[BudgetExceeded] = []
        self.exceeded: list[str] = []
        self.budgets = Budgets(budgets or {}, self.log, on_exceeded=self.tripped.append)
        self.socket = sockdir / f"{name}.sock"
        self.loop = loop
        self.gateway = ProviderGateway(provider, self.socket, self.log, self.budgets,
                                       record_path=record,
                                       environ={"PROVIDER_KEY": KEY} if environ is None
                                       else environ, limits=limits,
                                       host=None if limits is None else HostLimits(
                                           memory=limits.memory, refusals=limits.refusals,
                                           refusal_events=limits.refusal_events,
                                           sink=self.log, on_exceeded=self.exceeded.append))
        loop.run(self.gateway.start())
        self.http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(self.socket)),
                                  base_url=BASE, timeout=30)

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=BASE, api_key=PLACEHOLDER_KEY, http_client=self.http,
                                   max_retries=0)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=BASE + "/v1", api_key=PLACEHOLDER_KEY,
                             http_client=self.http, max_retries=0)

    def of(self, etype: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == etype]

    def close(self) -> None:
        self.http.close()
        self.loop.run(self.gateway.aclose())


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short, as AF_UNIX paths must be; pytest's tmp_path can be too long.
    d = Path(tempfile.mkdtemp(prefix="airlock-gw-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def harnesses(loop: LoopThread, sockdir: Path) -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.close()


def anthropic_policy(url: str, **kw: Any) -> ProviderPolicy:
    return ProviderPolicy(backend="anthropic", base_url=url, api_key_env="PROVIDER_KEY",
                          models={"default": "claude-sonnet-4-6", "triage": "claude-haiku-4-5"},
                          aliases={"sonnet": "claude-sonnet-4-6"}, **kw)


def openai_policy(url: str, backend: str = "openai", **kw: Any) -> ProviderPolicy:
    return ProviderPolicy(backend=backend, base_url=url + "/v1", api_key_env="PROVIDER_KEY",
                          models={"default": "gpt-5"}, aliases={"mini": "gpt-5-mini"}, **kw)


def make(harnesses: list[Harness], loop: LoopThread, sockdir: Path, provider: ProviderPolicy,
         **kw: Any) -> Harness:
    h = Harness(loop, sockdir, provider, **kw)
    harnesses.append(h)
    return h


def assert_key_stayed_out(h: Harness, up: ScriptedProvider,
                          responses: list[httpx2.Response]) -> None:
    for r in up.requests:
        assert PLACEHOLDER_KEY not in json.dumps(r.headers)
    for resp in responses:
        assert KEY not in resp.text
        assert KEY not in json.dumps(dict(resp.headers))
    assert KEY not in json.dumps([e.to_dict() for e in h.events])


# -- the official SDKs through the gateway -------------------------------------------

def test_anthropic_sdk_stream_and_plain(harnesses: list[Harness], loop: LoopThread,
                                        sockdir: Path) -> None:
    script = [{"text": "Hello from upstream", "usage": {"cache_read_tokens": 7}},
              {"tool": "get_weather", "arguments": {"city": "Paris"}}]
    with ScriptedProvider(script, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        client = h.anthropic()
        with client.messages.stream(model="sonnet", max_tokens=64,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            text = stream.get_final_text()
            final = stream.get_final_message()
        assert text == "Hello from upstream"
        assert final.usage.cache_read_input_tokens == 7
        msg = client.messages.create(model="claude-sonnet-4-6", max_tokens=64,
                                     messages=[{"role": "user", "content": "weather?"}])
        assert msg.stop_reason == "tool_use"
        assert msg.content[0].type == "tool_use" and msg.content[0].input == {"city": "Paris"}

        # the upstream saw the real key and the full model id, never the placeholder
        assert [r.header("x-api-key") for r in up.requests] == [KEY, KEY]
        assert [r.body["model"] for r in up.requests] == ["claude-sonnet-4-6"] * 2
        assert all(r.header("authorization") is None for r in up.requests)

        reqs = h.of("provider.request")
        assert [(r["stream"], r["status"], r["stop_reason"]) for r in reqs] == [
            (True, 200, "end_turn"), (False, 200, "tool_use")]
        first = reqs[0]
        assert first["model"] == "claude-sonnet-4-6" and first["requested_model"] == "sonnet"
        assert first["cache_read_tokens"] == 7
        assert first["input_tokens"] > 7  # normalised: cached tokens are part of the input
        assert first["output_tokens"] > 0 and first["bytes_out"] > 0 and first["latency_ms"] > 0
        assert h.budgets.used["requests"] == 2
        assert h.budgets.used["tokens"] == sum(r["input_tokens"] + r["output_tokens"]
                                               for r in reqs)
        raw = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                "messages": []})
        assert raw.status_code == 400  # the script is exhausted: the upstream's own error
        assert_key_stayed_out(h, up, [raw])


def test_openai_sdk_responses_stream_and_plain(harnesses: list[Harness], loop: LoopThread,
                                               sockdir: Path) -> None:
    script = [{"tool": "exec_command", "arguments": {"cmd": "ls"}}, {"text": "all done"}]
    with ScriptedProvider(script, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url))
        client = h.openai()
        stream = client.responses.create(model="gpt-5", input="list files", stream=True)
        types = [ev.type for ev in stream]
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert "response.output_item.done" in types
        resp = client.responses.create(model="gpt-5", input="and now?")
        assert resp.output_text == "all done"
        assert [r.header("authorization") for r in up.requests] == [f"Bearer {KEY}"] * 2
        assert [r.path for r in up.requests] == ["/v1/responses"] * 2
        reqs = h.of("provider.request")
        assert [r["stop_reason"] for r in reqs] == ["completed", "completed"]
        assert all(r["input_tokens"] and r["output_tokens"] for r in reqs)


def test_openai_sdk_chat_stream_and_plain(harnesses: list[Harness], loop: LoopThread,
                                          sockdir: Path) -> None:
    script = [{"text": "streamed chat reply"}, {"tool": "f", "arguments": {"a": 1}}]
    with ScriptedProvider(script, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url))
        client = h.openai()
        chunks = list(client.chat.completions.create(
            model="mini", messages=[{"role": "user", "content": "x"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            "streamed chat reply"
        plain = client.chat.completions.create(model="gpt-5",
                                               messages=[{"role": "user", "content": "x"}])
        assert plain.choices[0].message.tool_calls[0].function.name == "f"
        # the gateway asked for the usage chunk, so the stream's tokens were counted
        assert up.requests[0].body["stream_options"] == {"include_usage": True}
        assert up.requests[0].body["model"] == "gpt-5-mini"
        reqs = h.of("provider.request")
        assert [r["stop_reason"] for r in reqs] == ["stop", "tool_calls"]
        assert reqs[0]["output_tokens"] and reqs[0]["input_tokens"]


def test_openai_compatible_and_model_listing(harnesses: list[Harness], loop: LoopThread,
                                             sockdir: Path) -> None:
    with ScriptedProvider([{"text": "hi"}], api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url, backend="openai-compatible"))
        ids = [m.id for m in h.openai().models.list()]
        assert ids == ["gpt-5", "gpt-5-mini"]  # only what the policy allows
        assert h.http.get("/v1/models/gpt-5").json()["id"] == "gpt-5"
        assert h.http.get("/v1/models/claude-haiku-4-5").status_code == 403


def test_ollama_native_ndjson_and_openai_path(harnesses: list[Harness], loop: LoopThread,
                                              sockdir: Path) -> None:
    with ScriptedProvider([{"text": "one two three"}, {"text": "gen"}, {"text": "v1"}]) as up:
        provider = ProviderPolicy(backend="ollama", base_url=up.url, models={"default": "llama3"})
        h = make(harnesses, loop, sockdir, provider, environ={})
        with h.http.stream("POST", "/api/chat", json={"model": "llama3", "messages": [
                {"role": "user", "content": "count"}]}) as resp:
            assert resp.headers["content-type"] == "application/x-ndjson"
            lines = [json.loads(x) for x in resp.iter_lines() if x]
        assert "".join(x["message"]["content"] for x in lines) == "one two three"
        assert lines[-1]["done"] is True
        gen = h.http.post("/api/generate", json={"model": "llama3:latest", "prompt": "x",
                                                 "stream": False}).json()
        assert gen["response"] == "gen"
        v1 = h.openai().chat.completions.create(model="llama3",
                                                messages=[{"role": "user", "content": "x"}])
        assert v1.choices[0].message.content == "v1"
        tags = h.http.get("/api/tags").json()
        assert [m["name"] for m in tags["models"]] == ["llama3:latest"]
        assert h.http.post("/api/pull", json={"model": "llama3"}).status_code == 403
        assert h.http.delete("/api/delete").status_code == 403
        reqs = h.of("provider.request")
        assert reqs[0]["stop_reason"] == "stop" and reqs[0]["output_tokens"] == 3
        assert up.requests[1].body["model"] == "llama3"  # resolved from llama3:latest
        assert all(r.header("authorization") is None for r in up.requests)


def test_vertex_rewrites_path_and_injects_google_token(harnesses: list[Harness],
                                                       loop: LoopThread, sockdir: Path) -> None:
    token = "ya29.test-access-token-abcdef"
    with ScriptedProvider([{"text": "from vertex"}, {"text": "plain"}], api_key=token) as up:
        provider = ProviderPolicy(backend="vertex", base_url=up.url, project="proj",
                                  region="us-east5", api_key_env="GOOGLE_TOKEN",
                                  models={"default": "claude-sonnet-4-6@20260115"},
                                  aliases={"sonnet": "claude-sonnet-4-6@20260115"})
        h = make(harnesses, loop, sockdir, provider, environ={"GOOGLE_TOKEN": token})
        client = h.anthropic()
        with client.messages.stream(model="sonnet", max_tokens=10,
                                    messages=[{"role": "user", "content": "hi"}]) as s:
            assert s.get_final_text() == "from vertex"
        assert client.messages.create(model="sonnet", max_tokens=10, messages=[
            {"role": "user", "content": "hi"}]).content[0].text == "plain"
        prefix = "/v1/projects/proj/locations/us-east5/publishers/anthropic/models/"
        assert [r.path for r in up.requests] == [
            prefix + "claude-sonnet-4-6@20260115:streamRawPredict",
            prefix + "claude-sonnet-4-6@20260115:rawPredict"]
        assert "model" not in up.requests[0].body
        assert up.requests[0].body["anthropic_version"] == "vertex-2023-10-16"
        assert h.of("provider.request")[0]["stop_reason"] == "end_turn"


# -- refusals ---------------------------------------------------------------------------

def test_refusals_are_provider_shaped_and_events(harnesses: list[Harness], loop: LoopThread,
                                                 sockdir: Path) -> None:
    with ScriptedProvider([{"text": "ok"}] * 3, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir,
                 anthropic_policy(up.url, hosted_tools=["web_fetch"], tools=["mcp__run__*"]))
        client = h.anthropic()
        msg = [{"role": "user", "content": "hi"}]
        with pytest.raises(anthropic.PermissionDeniedError) as e1:
            client.messages.create(model="claude-opus-4", max_tokens=5, messages=msg)
        assert e1.value.body["error"]["type"] == "permission_error"
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.create(model="sonnet", max_tokens=5, messages=msg, tools=[
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.create(model="sonnet", max_tokens=5, messages=msg, tools=[
                {"name": "Bash", "input_schema": {"type": "object"}}])
        mcp = h.http.post("/v1/messages", json={
            "model": "sonnet", "max_tokens": 5, "messages": msg,
            "mcp_servers": [{"type": "url", "url": "https://evil.example/mcp", "name": "x"}]})
        assert mcp.status_code == 403
        path = h.http.post("/v1/files", json={})
        assert path.status_code == 403 and path.json()["type"] == "error"
        method = h.http.get("/v1/messages")
        query = h.http.post("/v1/messages?redirect=1", json={"model": "sonnet"})
        # named hosted tools and allowed function tools pass
        ok = client.messages.create(model="sonnet", max_tokens=5, messages=msg, tools=[
            {"type": "web_fetch_20250910", "name": "web_fetch"},
            {"name": "mcp__run__search", "input_schema": {"type": "object"}}])
        assert ok.content[0].text == "ok"
        # Claude Code's beta query passes
        assert h.http.post("/v1/messages?beta=true", json={
            "model": "sonnet", "max_tokens": 5, "messages": msg}).status_code == 200

        refused = h.of("provider.refused")
        assert [r["reason"] for r in refused] == [
            "model_not_allowed", "hosted_tool", "tool_not_allowed", "hosted_tool",
            "path_not_allowed", "method_not_allowed", "query_not_allowed"]
        assert refused[1]["tool"] == "web_search_20250305" and refused[3]["tool"] == "mcp_servers"
        assert all(r["status"] == 403 for r in refused)
        assert method.status_code == 403 and query.status_code == 403
        assert len(up.requests) == 2  # nothing refused reached the provider
        assert h.budgets.used["requests"] == 2  # refusals cost no budget


def test_openai_hosted_tools_refused(harnesses: list[Harness], loop: LoopThread,
                                     sockdir: Path) -> None:
    with ScriptedProvider([{"text": "fine"}], api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url))
        client = h.openai()
        for tool in ({"type": "web_search"}, {"type": "web_search_preview"},
                     {"type": "code_interpreter", "container": {"type": "auto"}},
                     {"type": "image_generation"}, {"type": "file_search",
                                                    "vector_store_ids": ["vs_1"]},
                     {"type": "mcp", "server_label": "x", "server_url": "https://e.x"},
                     {"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                      "environment": "linux"}):
            with pytest.raises(openai.PermissionDeniedError) as err:
                client.responses.create(model="gpt-5", input="x", tools=[tool])  # type: ignore[list-item]
            assert err.value.code == "airlock_hosted_tool"
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-5", messages=[
                {"role": "user", "content": "x"}], web_search_options={})
        ok = client.responses.create(model="gpt-5", input="x", tools=[
            {"type": "function", "name": "exec_command", "parameters": {"type": "object"}}])
        assert ok.output_text == "fine"
        assert [r["reason"] for r in h.of("provider.refused")] == ["hosted_tool"] * 8
        assert len(up.requests) == 1


def test_request_budget_refuses_and_trips(harnesses: list[Harness], loop: LoopThread,
                                          sockdir: Path) -> None:
    with ScriptedProvider([{"text": "a"}] * 5, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url), budgets={"requests": 2})
        client = h.anthropic()
        msg = [{"role": "user", "content": "hi"}]
        for _ in range(2):
            client.messages.create(model="sonnet", max_tokens=5, messages=msg)
        with pytest.raises(anthropic.RateLimitError) as err:
            client.messages.create(model="sonnet", max_tokens=5, messages=msg)
        assert err.value.status_code == 429
        assert err.value.response.headers["x-should-retry"] == "false"
        assert len(up.requests) == 2
        assert h.of("provider.refused")[0]["reason"] == "budget"
        assert h.of("budget.exceeded")[0]["counter"] == "requests"
        assert [t.counter for t in h.tripped] == ["requests"]


def test_token_budget_trips_after_the_response(harnesses: list[Harness], loop: LoopThread,
                                               sockdir: Path) -> None:
    script = [{"text": "a", "usage": {"input_tokens": 40, "output_tokens": 20}}] * 3
    with ScriptedProvider(script, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url), budgets={"tokens": 100})
        client = h.openai()
        client.responses.create(model="gpt-5", input="1")  # 60 tokens
        client.responses.create(model="gpt-5", input="2")  # 120 > 100: trips
        assert [t.counter for t in h.tripped] == ["tokens"]
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model="gpt-5", input="3")
        assert len(up.requests) == 2
        assert h.of("provider.refused")[0]["counter"] == "tokens"


def test_cost_from_the_policy_prices(harnesses: list[Harness], loop: LoopThread,
                                     sockdir: Path) -> None:
    script = [{"text": "a", "usage": {"input_tokens": 1000, "output_tokens": 200}}] * 2
    prices = {"gpt-5": {"input_per_mtok": 1.25, "output_per_mtok": 10.0},
              "*": {"input_per_mtok": 100.0, "output_per_mtok": 100.0}}
    with ScriptedProvider(script, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url, prices=prices))
        client = h.openai()
        client.responses.create(model="gpt-5", input="1")
        client.responses.create(model="mini", input="2")  # no own price: the `*` one
        reqs = h.of("provider.request")
        assert [r["cost_usd"] for r in reqs] == [0.00325, 0.12]


def test_no_price_means_no_cost(harnesses: list[Harness], loop: LoopThread,
                                sockdir: Path) -> None:
    script = [{"text": "a", "usage": {"input_tokens": 1000, "output_tokens": 200}}]
    prices = {"other": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}
    with ScriptedProvider(script, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url, prices=prices))
        h.openai().responses.create(model="gpt-5", input="1")
        (req,) = h.of("provider.request")
        assert req["input_tokens"] == 1000 and "cost_usd" not in req


def test_missing_credential_fails_at_start(loop: LoopThread, sockdir: Path) -> None:
    provider = anthropic_policy("http://127.0.0.1:9")
    gw = ProviderGateway(provider, sockdir / "x.sock", EventLog(None, "r"), Budgets({}),
                         environ={})
    with pytest.raises(CredentialError, match="PROVIDER_KEY"):
        loop.run(gw.start())
    assert not (sockdir / "x.sock").exists()
    keyfile = sockdir / "missing.key"
    gw = ProviderGateway(ProviderPolicy(backend="openai", api_key_file=str(keyfile),
                                        models={"d": "gpt-5"}),
                         sockdir / "y.sock", EventLog(None, "r"), Budgets({}), environ={})
    with pytest.raises(CredentialError, match="cannot be read"):
        loop.run(gw.start())


def test_key_file_and_socket_mode(harnesses: list[Harness], loop: LoopThread,
                                  sockdir: Path) -> None:
    keyfile = sockdir / "key"
    keyfile.write_text(KEY + "\n")
    with ScriptedProvider([{"text": "x"}], api_key=KEY) as up:
        provider = ProviderPolicy(backend="anthropic", base_url=up.url,
                                  api_key_file=str(keyfile), models={"d": "claude-haiku-4-5"})
        h = make(harnesses, loop, sockdir, provider, environ={})
        assert h.socket.stat().st_mode & 0o777 == 0o666
        assert h.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=5, messages=[
            {"role": "user", "content": "x"}]).content[0].text == "x"


def test_secret_echoed_by_upstream_is_scrubbed(harnesses: list[Harness], loop: LoopThread,
                                               sockdir: Path) -> None:
    # As an error body echoing the key would. (Bytes are scrubbed: a key the model
    # spelled out across several deltas would not be caught; no upstream has it to.)
    echo = f"your key is {KEY}, keep it safe"
    with ScriptedProvider([{"text": echo}, {"text": echo}], api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        client = h.anthropic()
        with client.messages.stream(model="sonnet", max_tokens=5, messages=[
                {"role": "user", "content": "x"}]) as s:
            streamed = s.get_final_text()
        plain = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                  "messages": []})
        assert KEY not in streamed and "[REDACTED]" in streamed
        assert KEY not in plain.text and "[REDACTED]" in plain.text


def test_upstream_unreachable_is_502_and_event(harnesses: list[Harness], loop: LoopThread,
                                               sockdir: Path) -> None:
    h = make(harnesses, loop, sockdir, anthropic_policy("http://127.0.0.1:9"))
    resp = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5, "messages": []})
    assert resp.status_code == 502 and resp.json()["type"] == "error"
    ev = h.of("provider.request")[0]
    assert ev["status"] == 502 and "unreachable" in ev["error"]


# -- streaming ----------------------------------------------------------------------------

def test_slow_upstream_streams_chunk_by_chunk(harnesses: list[Harness], loop: LoopThread,
                                              sockdir: Path) -> None:
    words = "one two three four five six seven eight"
    with ScriptedProvider([{"text": words}, {"text": words}], api_key=KEY,
                          chunk_delay=0.15) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        t0 = time.monotonic()
        arrivals = []
        with h.http.stream("POST", "/v1/messages", json={
                "model": "sonnet", "max_tokens": 50, "stream": True, "messages": []}) as resp:
            for _ in resp.iter_raw():
                arrivals.append(time.monotonic() - t0)
        # 14 events, 0.15 s apart: the stream takes about 2 s; the first bytes come at once
        assert arrivals[-1] > 1.5
        assert arrivals[0] < 0.5
        assert len(arrivals) >= 10  # chunked through, not buffered into one piece
        # the SDK sees text deltas spread over time as well
        stamps = []
        with h.anthropic().messages.stream(model="sonnet", max_tokens=50, messages=[
                {"role": "user", "content": "x"}]) as s:
            t1 = time.monotonic()
            for _ in s.text_stream:
                stamps.append(time.monotonic() - t1)
        assert len(stamps) == 8 and stamps[-1] - stamps[0] > 0.9
        ev = h.of("provider.request")[0]
        assert ev["ttfb_ms"] < 500 and ev["latency_ms"] > 1500


# -- record and replay -------------------------------------------------------------------

def _exchanges(h: Harness) -> list[httpx2.Response]:
    msg = [{"role": "user", "content": "hi"}]
    out = []
    out.append(h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                 "stream": True, "messages": msg}))
    out.append(h.http.post("/v1/messages", json={"model": "claude-haiku-4-5",
                                                 "max_tokens": 5, "messages": msg}))
    return out


def test_record_then_replay_is_identical(harnesses: list[Harness], loop: LoopThread,
                                         sockdir: Path) -> None:
    record = sockdir / "rec.jsonl"
    script = [{"text": "recorded stream"}, {"tool": "read_file", "arguments": {"p": "a"}}]
    with ScriptedProvider(script, api_key=KEY) as up:
        rec = make(harnesses, loop, sockdir, anthropic_policy(up.url), record=record,
                   name="rec")
        original = _exchanges(rec)
        rec.close()
        harnesses.remove(rec)
    text = record.read_text()
    assert KEY not in text and PLACEHOLDER_KEY not in text
    lines = [json.loads(x) for x in text.splitlines()]
    assert lines[0]["backend"] == "anthropic" and len(lines) == 3
    assert len(lines[1]["response"]["chunks"]) > 5  # the SSE chunks, as they came

    # offline: no upstream, no key
    replay = ProviderPolicy(backend="replay", replay_file=str(record))
    h = make(harnesses, loop, sockdir, replay, environ={}, name="replay")
    assert h.gateway.agent_env("http://127.0.0.1:7")["ANTHROPIC_BASE_URL"] == \
        "http://127.0.0.1:7"
    again = _exchanges(h)
    for a, b in zip(original, again, strict=True):
        assert (a.status_code, a.content, a.headers["content-type"]) == \
            (b.status_code, b.content, b.headers["content-type"])
    reqs = h.of("provider.request")
    assert [r["replay"]["index"] for r in reqs] == [1, 2]
    assert all(r["replay"]["body_match"] for r in reqs)
    assert reqs[0]["stop_reason"] == "end_turn" and reqs[1]["stop_reason"] == "tool_use"
    # past the end of the recording: a clear error and an event
    extra = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                              "messages": []})
    assert extra.status_code == 409 and "no recorded exchange" in extra.json()["error"]["message"]
    assert h.of("provider.replay_mismatch")[0]["index"] == 2


def test_replay_mismatch_is_an_error_event(harnesses: list[Harness], loop: LoopThread,
                                           sockdir: Path) -> None:
    record = sockdir / "rec.jsonl"
    with ScriptedProvider([{"text": "a"}, {"text": "b"}], api_key=KEY) as up:
        rec = make(harnesses, loop, sockdir, anthropic_policy(up.url), record=record, name="r")
        _exchanges(rec)
    h = make(harnesses, loop, sockdir, ProviderPolicy(backend="replay",
                                                      replay_file=str(record)),
             environ={}, name="p")
    # the second recorded request comes first: model and stream flag differ
    bad = h.http.post("/v1/messages", json={"model": "claude-haiku-4-5", "max_tokens": 5,
                                            "messages": []})
    assert bad.status_code == 409 and bad.json()["type"] == "error"
    mm = h.of("provider.replay_mismatch")[0]
    assert mm["expected"]["model"] == "claude-sonnet-4-6" and mm["got"]["stream"] is False
    # the mismatch consumed nothing: the recorded order still replays
    assert [r.status_code for r in _exchanges(h)] == [200, 200]


def test_replay_of_openai_responses_with_the_sdk(harnesses: list[Harness], loop: LoopThread,
                                                 sockdir: Path) -> None:
    record = sockdir / "oa.jsonl"
    with ScriptedProvider([{"tool": "exec_command", "arguments": {"cmd": "ls"}},
                           {"text": "done"}], api_key=KEY) as up:
        rec = make(harnesses, loop, sockdir, openai_policy(up.url), record=record, name="o")
        first = [ev.to_dict() for ev in rec.openai().responses.create(
            model="gpt-5", input="x", stream=True)]
        second = rec.openai().responses.create(model="gpt-5", input="y").output_text
    h = make(harnesses, loop, sockdir, ProviderPolicy(
        backend="replay", replay_file=str(record), models={"default": "gpt-5"}),
        environ={}, name="q")
    assert set(h.gateway.agent_env("http://127.0.0.1:7")) == {"OPENAI_BASE_URL",
                                                              "OPENAI_API_KEY"}
    assert [ev.to_dict() for ev in h.openai().responses.create(
        model="gpt-5", input="x", stream=True)] == first
    assert h.openai().responses.create(model="gpt-5", input="y").output_text == second


# -- isolation between runs ----------------------------------------------------------------

def test_two_gateways_are_independent(harnesses: list[Harness], loop: LoopThread,
                                      sockdir: Path) -> None:
    key_b = "sk-other-run-key-9876543210"
    with ScriptedProvider([{"text": "from A"}] * 4, api_key=KEY, chunk_delay=0.02) as up_a, \
            ScriptedProvider([{"text": "from B"}] * 4, api_key=key_b, chunk_delay=0.02) as up_b:
        a = make(harnesses, loop, sockdir, anthropic_policy(up_a.url), name="a",
                 budgets={"requests": 4})
        b = make(harnesses, loop, sockdir, openai_policy(up_b.url), name="b",
                 environ={"PROVIDER_KEY": key_b}, budgets={"requests": 4})
        results: dict[str, list[str]] = {"a": [], "b": []}

        def run_a() -> None:
            for _ in range(3):
                results["a"].append(a.anthropic().messages.create(
                    model="sonnet", max_tokens=5,
                    messages=[{"role": "user", "content": "x"}]).content[0].text)

        def run_b() -> None:
            for _ in range(3):
                results["b"].append(b.openai().responses.create(model="gpt-5",
                                                                input="x").output_text)

        threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {"a": ["from A"] * 3, "b": ["from B"] * 3}
        assert a.socket != b.socket
        # each gateway holds only its own key, reaches only its own upstream, and
        # speaks only its own API
        assert {r.header("x-api-key") for r in up_a.requests} == {KEY}
        assert {r.header("authorization") for r in up_b.requests} == {f"Bearer {key_b}"}
        assert a.http.post("/v1/responses", json={"model": "gpt-5"}).status_code == 403
        assert (a.budgets.used["requests"], b.budgets.used["requests"]) == (3, 3)
        assert all(e.run_id == "run-a" for e in a.events)
        assert all(e.run_id == "run-b" for e in b.events)
        # closing one leaves the other serving
        a.close()
        harnesses.remove(a)
        assert not a.socket.exists()
        assert b.openai().responses.create(model="gpt-5", input="x").output_text == "from B"


# -- units ------------------------------------------------------------------------------

def test_agent_env_per_backend() -> None:
    from runner.gateway.backends import agent_env

    assert agent_env("anthropic", "http://127.0.0.1:5") == {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:5", "ANTHROPIC_API_KEY": PLACEHOLDER_KEY}
    assert agent_env("openai-compatible", "http://127.0.0.1:5/")["OPENAI_BASE_URL"] == \
        "http://127.0.0.1:5/v1"
    assert agent_env("ollama", "http://127.0.0.1:5")["OLLAMA_HOST"] == "http://127.0.0.1:5"


def test_usage_meter_survives_any_chunking() -> None:
    from runner.gateway.usage import UsageMeter
    from runner.testing import wire

    turn = wire.parse_turn({"text": "hello world", "usage": {"cache_write_tokens": 3}})
    usage = wire.Usage(10, 4, 2, 3)
    stream = b"".join(wire.anthropic_stream(turn, "m", usage, None))
    for size in (1, 7, 64, len(stream)):
        meter = UsageMeter("text/event-stream")
        for i in range(0, len(stream), size):
            meter.feed(stream[i:i + size])
        u = meter.finish()
        assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens,
                u.stop_reason) == (15, 4, 2, 3, "end_turn")


def test_scrubber_catches_secret_split_across_chunks() -> None:
    from runner.gateway.headers import Scrubber

    data = f"data: {{\"x\": \"{KEY}\"}}\n\n".encode()
    for cut in range(1, len(data)):
        s = Scrubber([KEY])
        out = s.feed(data[:cut]) + s.feed(data[cut:]) + s.flush()
        assert KEY.encode() not in out and b"[REDACTED]" in out


def test_hosted_tool_matching() -> None:
    from runner.gateway.tools import check_tools

    body = {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    assert check_tools("messages", body, [], None) is not None
    for allowed in ("web_search", "web_search_20250305"):
        assert check_tools("messages", body, [allowed], None) is None
    chat = {"tools": [{"type": "function", "function": {"name": "mcp__run__x"}}]}
    assert check_tools("chat", chat, [], ["mcp__run__*"]) is None
    refusal = check_tools("chat", chat, [], ["other"])
    assert refusal is not None and refusal.reason == "tool_not_allowed"
    assert check_tools("responses", {"tools": [{"type": "local_shell"}]}, [], None) is not None
    ns = {"tools": [{"type": "namespace", "name": "mcp__run", "description": "",
                     "tools": [{"type": "function", "name": "search"}]}]}
    assert check_tools("responses", ns, [], ["mcp__run__*"]) is None
    assert check_tools("responses", ns, [], ["search"]) is not None
    ns["tools"][0]["tools"].append({"type": "web_search"})  # type: ignore[index,union-attr]
    assert check_tools("responses", ns, [], None) is not None


def test_ai_gateway_backend_uses_bearer(harnesses: list[Harness], loop: LoopThread,
                                        sockdir: Path) -> None:
    with ScriptedProvider([{"text": "via gateway"}], api_key=KEY) as up:
        provider = ProviderPolicy(backend="gateway", base_url=up.url + "/v1",
                                  api_key_env="PROVIDER_KEY",
                                  models={"default": "anthropic/claude-sonnet-4-6"})
        h = make(harnesses, loop, sockdir, provider)
        msg = h.anthropic().messages.create(model="anthropic/claude-sonnet-4-6", max_tokens=5,
                                            messages=[{"role": "user", "content": "x"}])
        assert msg.content[0].text == "via gateway"
        assert up.requests[0].path == "/v1/messages"
        assert up.requests[0].header("authorization") == f"Bearer {KEY}"
        assert up.requests[0].header("x-api-key") is None


def test_client_gone_mid_stream_closes_upstream(harnesses: list[Harness], loop: LoopThread,
                                                sockdir: Path) -> None:
    with ScriptedProvider([{"text": "a b c d e f g h i j"}, {"text": "next"}], api_key=KEY,
                          chunk_delay=0.1) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        with h.http.stream("POST", "/v1/messages", json={
                "model": "sonnet", "max_tokens": 5, "stream": True, "messages": []}) as resp:
            next(resp.iter_raw())
        # closing early drops the connection; the gateway records it and moves on
        deadline = time.monotonic() + 5
        while not h.of("provider.request") and time.monotonic() < deadline:
            time.sleep(0.05)
        ev = h.of("provider.request")[0]
        assert ev["error"].startswith("client went away") and ev["bytes_out"] > 0
        assert h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                 "messages": []}).json()["content"][0][
            "text"] == "next"


def test_concurrent_streams_through_one_gateway(harnesses: list[Harness], loop: LoopThread,
                                                sockdir: Path) -> None:
    n = 16
    with ScriptedProvider(lambda req: {"text": f"reply to {req.body['messages'][0]['content']}"},
                          api_key=KEY, chunk_delay=0.05) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        results: dict[int, str] = {}

        def one(i: int) -> None:
            client = anthropic.Anthropic(
                base_url=BASE, api_key=PLACEHOLDER_KEY, max_retries=0,
                http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=str(h.socket))))
            with client.messages.stream(model="sonnet", max_tokens=5, messages=[
                    {"role": "user", "content": f"n{i}"}]) as s:
                results[i] = s.get_final_text()

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - t0
        assert results == {i: f"reply to n{i}" for i in range(n)}
        # each stream takes ~0.4 s; served one after another they would take n times that
        assert elapsed < 0.4 * n / 2
        assert len(h.of("provider.request")) == n


def test_scripted_provider_runs_as_a_module(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "turns.json"
    script.write_text(json.dumps([{"text": "from the CLI"}]))
    proc = subprocess.Popen([sys.executable, "-m", "runner.testing.scripted_provider",
                             "--script", str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert client.responses.create(model="gpt-5", input="hi").output_text == "from the CLI"
    finally:
        proc.terminate()
        proc.wait(10)


def test_vertex_service_account_key_file(harnesses: list[Harness], loop: LoopThread,
                                         sockdir: Path) -> None:
    """A service-account key is exchanged for an access token (JWT-bearer grant)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    grants: list[dict[str, Any]] = []

    class TokenEndpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            form = parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
            claims = jwt.decode(form["assertion"][0], private.public_key(), algorithms=["RS256"],
                                audience=f"http://127.0.0.1:{token_server.server_port}/token")
            grants.append({"grant_type": form["grant_type"][0], **claims})
            body = json.dumps({"access_token": "ya29.from-service-account",
                               "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    token_server = ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=token_server.serve_forever, daemon=True).start()
    sa = sockdir / "sa.json"
    sa.write_text(json.dumps({
        "type": "service_account", "client_email": "run@proj.iam.gserviceaccount.com",
        "private_key": pem, "private_key_id": "k1",
        "token_uri": f"http://127.0.0.1:{token_server.server_port}/token"}))
    try:
        with ScriptedProvider([{"text": "sa ok"}], api_key="ya29.from-service-account") as up:
            provider = ProviderPolicy(backend="vertex", base_url=up.url, project="p",
                                      region="global", api_key_file=str(sa),
                                      models={"default": "claude-haiku-4-5@20251001"})
            h = make(harnesses, loop, sockdir, provider, environ={})
            msg = h.anthropic().messages.create(model="claude-haiku-4-5@20251001", max_tokens=5,
                                                messages=[{"role": "user", "content": "x"}])
            assert msg.content[0].text == "sa ok"
            assert grants[0]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
            assert grants[0]["iss"] == "run@proj.iam.gserviceaccount.com"
            assert "/locations/global/" in up.requests[0].path
    finally:
        token_server.shutdown()


# -- the upstream connection ---------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    import subprocess

    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA and a server certificate for localhost, made with openssl."""
    d = tmp_path_factory.mktemp("ca")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=Airlock test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
             "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)
    return {"ca": d / "ca.pem", "cert": d / "srv.pem", "key": d / "srv.key"}


def _tls_provider(test_ca: dict[str, Path], script: list[dict[str, Any]]) -> ScriptedProvider:
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(test_ca["cert"], test_ca["key"])
    return ScriptedProvider(script, api_key=KEY, tls=ctx)


def test_https_upstream_trusted_through_ca_file(harnesses: list[Harness], loop: LoopThread,
                                                sockdir: Path, test_ca: dict[str, Path]) -> None:
    with _tls_provider(test_ca, [{"text": "over tls"}, {"text": "streamed over tls"}]) as up:
        assert up.url.startswith("https://localhost:")
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url, ca_file=str(test_ca["ca"])))
        client = h.anthropic()
        msg = client.messages.create(model="sonnet", max_tokens=5,
                                     messages=[{"role": "user", "content": "x"}])
        assert msg.content[0].text == "over tls"
        with client.messages.stream(model="sonnet", max_tokens=5, messages=[
                {"role": "user", "content": "y"}]) as s:
            assert s.get_final_text() == "streamed over tls"
        assert [e["status"] for e in h.of("provider.request")] == [200, 200]
        assert h.of("provider.gateway_started")[0]["ca_file"] == str(test_ca["ca"])


def test_https_upstream_with_an_unknown_ca_is_refused(harnesses: list[Harness],
                                                      loop: LoopThread, sockdir: Path,
                                                      test_ca: dict[str, Path]) -> None:
    with _tls_provider(test_ca, [{"text": "must not arrive"}]) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))  # default trust store
        resp = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                 "messages": []})
        assert resp.status_code == 502
        ev = h.of("provider.request")[0]
        assert ev["status"] == 502 and "CERTIFICATE_VERIFY_FAILED" in ev["error"]
        assert up.requests == []  # the key was never sent


def test_https_upstream_name_must_match_the_certificate(harnesses: list[Harness],
                                                        loop: LoopThread, sockdir: Path,
                                                        test_ca: dict[str, Path]) -> None:
    with _tls_provider(test_ca, [{"text": "must not arrive"}]) as up:
        by_ip = up.url.replace("localhost", "127.0.0.1")  # the certificate names localhost
        h = make(harnesses, loop, sockdir, anthropic_policy(by_ip, ca_file=str(test_ca["ca"])))
        resp = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                 "messages": []})
        assert resp.status_code == 502
        assert "CERTIFICATE_VERIFY_FAILED" in h.of("provider.request")[0]["error"]
        assert up.requests == []


def test_unreadable_ca_file_stops_the_gateway_at_start(loop: LoopThread, sockdir: Path) -> None:
    from runner.errors import NotReady

    provider = anthropic_policy("https://localhost:9", ca_file=str(sockdir / "missing.pem"))
    gw = ProviderGateway(provider, sockdir / "gw.sock", EventLog(None, "r"),
                         Budgets({}, EventLog(None, "r")), environ={"PROVIDER_KEY": KEY})
    with pytest.raises(NotReady, match=r"provider\.ca_file"):
        loop.run(gw.start())


def test_duplicate_json_keys_reach_the_provider_resolved(harnesses: list[Harness],
                                                          loop: LoopThread, sockdir: Path) -> None:
    # A body is checked as Python parses it (the last of duplicate keys wins) and then
    # re-serialised, so a provider whose parser keeps the first key cannot be handed a
    # model or tool the check never saw.
    with ScriptedProvider([{"text": "ok"}], api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        raw = (b'{"model":"claude-opus-4-1","model":"sonnet","max_tokens":5,'
               b'"messages":[]}')
        resp = h.http.post("/v1/messages", content=raw,
                           headers={"content-type": "application/json"})
        assert resp.status_code == 200
        sent = up.requests[0].raw
        assert sent.count(b'"model"') == 1 and b"claude-opus" not in sent
        assert json.loads(sent)["model"] == "claude-sonnet-4-6"


def test_upstream_connections_are_reused_and_replaced(harnesses: list[Harness],
                                                      loop: LoopThread, sockdir: Path) -> None:
    with ScriptedProvider([{"text": "ok"}], api_key=KEY, loop=True) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        body = {"model": "sonnet", "max_tokens": 5, "messages": []}
        for _ in range(5):
            assert h.http.post("/v1/messages", json=body).status_code == 200
        client = h.gateway._client
        assert client is not None

        def idle() -> list[Any]:
            return [c for conns in client._idle.values() for c in conns]

        # The connection goes back to the pool just after the response has gone out.
        deadline = time.monotonic() + 5
        while not idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Five requests, one connection kept alive (two if a request came in just before
        # the previous one's connection was handed back).
        assert 1 <= len(idle()) <= 2
        # The provider closes idle connections whenever it likes: the next request
        # notices and opens a new one instead of failing.
        loop.run(_close_peer(idle()[0]))
        assert h.http.post("/v1/messages", json=body).status_code == 200
        assert len(up.requests) == 6


async def _close_peer(conn: Any) -> None:
    import asyncio

    sock = conn._network_stream.get_extra_info("socket")
    sock.shutdown(2)  # the connection ends under the pool, as when a provider hangs up
    await asyncio.sleep(0.05)


def test_upstream_cut_mid_stream_cuts_the_agent_too(harnesses: list[Harness], loop: LoopThread,
                                                    sockdir: Path) -> None:
    import socket

    # A provider that starts a chunked stream and then drops the connection.
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n"
                     b"1a\r\nevent: ping\ndata: {\"a\":1}\n\n\r\n")
        time.sleep(0.2)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    h = make(harnesses, loop, sockdir, anthropic_policy(f"http://127.0.0.1:{port}"))
    got = b""
    with pytest.raises(httpx2.RemoteProtocolError), h.http.stream("POST", "/v1/messages", json={
            "model": "sonnet", "max_tokens": 5, "stream": True, "messages": []}) as resp:
        for chunk in resp.iter_raw():
            got += chunk
    assert b"event: ping" in got  # what came was passed on; the end never was
    t.join(5)
    srv.close()
    deadline = time.monotonic() + 5
    while not h.of("provider.request") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert h.of("provider.request")[0]["error"].startswith("upstream failed mid-stream")


def test_host_ssl_variables_do_not_choose_who_gets_the_key(harnesses: list[Harness],
                                                           loop: LoopThread, sockdir: Path,
                                                           test_ca: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca["ca"]))
    monkeypatch.setenv("SSL_CERT_DIR", str(test_ca["ca"].parent))
    with _tls_provider(test_ca, [{"text": "must not arrive"}]) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        resp = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5,
                                                 "messages": []})
        assert resp.status_code == 502 and up.requests == []


def test_cleartext_before_the_tls_handshake_is_refused(harnesses: list[Harness],
                                                       loop: LoopThread, sockdir: Path) -> None:
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged")
        time.sleep(1)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    h = make(harnesses, loop, sockdir, anthropic_policy(f"https://localhost:{port}"))
    resp = h.http.post("/v1/messages", json={"model": "sonnet", "max_tokens": 5, "messages": []})
    assert resp.status_code == 502 and b"forged" not in resp.content
    t.join(5)
    srv.close()


# -- provider-side fetches ----------------------------------------------------------------

EXFIL = "https://exfil.example/leak?secret=abc"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def _anthropic_url_bodies() -> list[dict[str, Any]]:
    image = {"type": "image", "source": {"type": "url", "url": EXFIL}}
    document = {"type": "document", "source": {"type": "url", "url": EXFIL}}
    base = {"model": "sonnet", "max_tokens": 5}
    return [
        {**base, "messages": [{"role": "user", "content": [image]}]},
        {**base, "messages": [{"role": "user", "content": [document]}]},
        {**base, "system": [{"type": "text", "text": "s"}, document],
         "messages": [{"role": "user", "content": "hi"}]},
        {**base, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                               "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": [image]}]}]},
        {**base, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "content", "content": [image]}}]}]},
    ]


def test_anthropic_url_sources_are_refused_anywhere(harnesses: list[Harness],
                                                    loop: LoopThread, sockdir: Path) -> None:
    with ScriptedProvider([{"text": "ok"}] * 2, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        client = h.anthropic()
        with pytest.raises(anthropic.PermissionDeniedError) as err:
            client.messages.create(model="sonnet", max_tokens=5, messages=[
                {"role": "user", "content": [{"type": "image", "source": {
                    "type": "url", "url": EXFIL}}]}])
        assert "provider.url_sources" in err.value.body["error"]["message"]
        for body in _anthropic_url_bodies():
            assert h.http.post("/v1/messages", json=body).status_code == 403, body
        # Base64 images and plain-text documents are the agent's own bytes: they pass.
        ok = client.messages.create(model="sonnet", max_tokens=5, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "some text"}}]}])
        assert ok.content[0].text == "ok"
        refused = h.of("provider.refused")
        assert [r["reason"] for r in refused] == ["url_source"] * 6
        assert refused[0]["where"] == "messages[0].content[0].source"
        assert refused[3]["where"] == "system[1].source"
        assert refused[4]["where"] == "messages[2].content[0].content[0].source"
        assert len(up.requests) == 1 and EXFIL not in up.requests[0].raw.decode()
        assert h.budgets.used["requests"] == 1


def test_openai_url_sources_stored_prompts_and_background_are_refused(
        harnesses: list[Harness], loop: LoopThread, sockdir: Path) -> None:
    with ScriptedProvider([{"text": "fine"}] * 4, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url))
        client = h.openai()
        chat_image = {"type": "image_url", "image_url": {"url": EXFIL}}
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="gpt-5", messages=[
                {"role": "user", "content": [chat_image]}])  # type: ignore[list-item]
        assert err.value.code == "airlock_url_source"
        refusals: list[tuple[str, dict[str, Any]]] = [
            ("/v1/chat/completions", {"model": "gpt-5", "messages": [
                {"role": "user", "content": [{"type": "file", "file": {"file_url": EXFIL}}]}]}),
            ("/v1/responses", {"model": "gpt-5", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": EXFIL}]}]}),
            ("/v1/responses", {"model": "gpt-5", "input": [{"role": "user", "content": [
                {"type": "input_file", "file_url": EXFIL}]}]}),
            ("/v1/responses", {"model": "gpt-5", "input": [
                {"type": "function_call_output", "call_id": "c1", "output": [
                    {"type": "input_image", "image_url": "HTTP://exfil.example/x"}]}]}),
            ("/v1/responses", {"model": "gpt-5", "input": [
                {"type": "computer_call_output", "call_id": "c2", "output": {
                    "type": "computer_screenshot", "image_url": EXFIL}}]}),
            ("/v1/responses", {"model": "gpt-5", "input": "x",
                               "prompt": {"id": "pmpt_1", "version": "2"}}),
            ("/v1/responses", {"model": "gpt-5", "input": "x", "background": True}),
        ]
        for path, body in refusals:
            assert h.http.post(path, json=body).status_code == 403, body
        # data: URLs are the agent's own bytes
        data_url = f"data:image/png;base64,{PNG}"
        ok = client.chat.completions.create(model="gpt-5", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}])
        assert ok.choices[0].message.content == "fine"
        r = client.responses.create(model="gpt-5", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": data_url, "detail": "auto"}]}],
            background=False)
        assert r.output_text == "fine"
        assert [r["reason"] for r in h.of("provider.refused")] == (
            ["url_source"] * 6 + ["stored_prompt", "background"])
        assert len(up.requests) == 2
        assert not any("exfil.example" in u.raw.decode() for u in up.requests)


def test_policy_can_allow_url_sources_and_stored_prompts(harnesses: list[Harness],
                                                         loop: LoopThread,
                                                         sockdir: Path) -> None:
    with ScriptedProvider([{"text": "fine"}] * 2, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url, url_sources=True,
                                                         stored_prompts=True))
        assert h.http.post("/v1/responses", json={"model": "gpt-5", "input": [
            {"role": "user", "content": [{"type": "input_image", "image_url": EXFIL}]}],
        }).status_code == 200
        assert h.http.post("/v1/responses", json={
            "model": "gpt-5", "input": "x", "prompt": {"id": "pmpt_1"}}).status_code == 200
        assert h.of("provider.refused") == [] and len(up.requests) == 2


# -- a hostile sandbox against the gateway (issue 13); the in-sandbox runs are in
# -- tests/test_gateway_hostile.py ------------------------------------------------------

def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _raw(h: Harness, data: bytes, timeout: float = 30) -> bytes:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(h.socket))
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out:
                break
    finally:
        s.close()
    return out


def test_json_bomb_is_refused_before_parsing(harnesses: list[Harness], loop: LoopThread,
                                             sockdir: Path) -> None:
    # The reviewer's 60 MiB of `{}` expanded to ~1.8 GB parsed; at the body limit
    # (32 MiB) it would still be ~0.9 GB. Counted before parsing, it is refused.
    with ScriptedProvider([{"text": "ok"}], api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        n = (30 << 20) // 3
        body = (b'{"model":"sonnet","max_tokens":5,"messages":[{"role":"user","content":"x"}],'
                b'"x":[' + b",".join([b"{}"] * n) + b"]}")
        before = _rss()
        answer = _raw(h, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                      b"\r\n%b" % (len(body), body))
        growth = _rss() - before
        del body
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert growth < 200 << 20, growth  # the test's own copies; parsed it was ~900 MB
        refused = h.of("provider.refused")
        assert [r["reason"] for r in refused] == ["json_too_large"]
        # Deep nesting is refused too, not a crash of the handler.
        deep = b'{"model":"sonnet","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
        assert _raw(h, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                    b"\r\n%b" % (len(deep), deep)).startswith(b"HTTP/1.1 400")
        assert up.requests == []
        assert wait_for(lambda: h.gateway.host.held == 0, 5), h.gateway.host.held  # given back


def test_refusals_are_clipped_capped_and_summarised(harnesses: list[Harness],
                                                   loop: LoopThread, sockdir: Path) -> None:
    from runner.policy.models import ServiceLimits

    with ScriptedProvider([{"text": "ok"}], api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url))
        h.close()
        harnesses.remove(h)
        h = Harness(loop, sockdir, anthropic_policy(up.url), name="capped",
                    limits=ServiceLimits(refusal_events=5, refusals=50))
        harnesses.append(h)
        path = "/" + "a" * 60_000
        for _ in range(30):
            assert h.http.get(path).status_code == 403
        with pytest.raises(anthropic.PermissionDeniedError):
            h.anthropic().messages.create(model="m" * 50_000, max_tokens=5,
                                          messages=[{"role": "user", "content": "x"}])
        refused = h.of("provider.refused")
        assert len(refused) == 5
        logged = json.dumps([e.to_dict() for e in h.events])
        assert len(logged) < 10_000, len(logged)  # 60 KB paths, logged as 200 characters
        assert h.tripped == [] and h.exceeded == []
        for _ in range(25):
            h.http.get(path)
        assert h.exceeded == ["refusals"]  # past 50: the run is ended as abusive
        assert h.of("limits.exceeded")[0]["limit"] == "refusals"
        h.close()
        harnesses.remove(h)
        summary = h.of("provider.refused_summary")
        assert summary == [{"suppressed": 51, "by_reason": {"path_not_allowed": 50,
                                                            "model_not_allowed": 1},
                            "refused": 56}]


def test_connection_cap_and_deadlines_keep_the_neighbour_served(
        harnesses: list[Harness], loop: LoopThread, sockdir: Path) -> None:
    import socket

    from runner.policy.models import ServiceLimits

    with ScriptedProvider([{"text": "ok"}] * 4, api_key=KEY) as up:
        h = Harness(loop, sockdir, anthropic_policy(up.url), name="attacked",
                    limits=ServiceLimits(connections=8, head_timeout=1.0, body_timeout=1.0))
        harnesses.append(h)
        neighbour = make(harnesses, loop, sockdir, anthropic_policy(up.url), name="next")
        socks = []
        for _ in range(12):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(h.socket))
            socks.append(s)
        # a stalled head and a stalled body on two of them
        socks[0].sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n")
        socks[1].sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        for s in socks[:2]:
            s.settimeout(5)
        assert socks[0].recv(100).startswith(b"HTTP/1.1 408")
        assert socks[1].recv(100).startswith(b"HTTP/1.1 408")
        msg = [{"role": "user", "content": "x"}]
        # the neighbour's gateway answers meanwhile
        assert neighbour.anthropic().messages.create(
            model="sonnet", max_tokens=5, messages=msg).content[0].text == "ok"
        reasons = [r["reason"] for r in h.of("provider.refused")]
        assert reasons.count("connections") == 4, reasons
        assert {"head_timeout", "body_timeout"} <= set(reasons)
        for s in socks:
            s.close()
        assert wait_for(lambda: len(h.gateway._server._conns) == 0, 5)
        assert h.anthropic().messages.create(model="sonnet", max_tokens=5,
                                             messages=msg).content[0].text == "ok"


def test_concurrent_requests_cannot_overrun_the_token_budget(
        harnesses: list[Harness], loop: LoopThread, sockdir: Path) -> None:
    # Before reservations: 40 concurrent requests ran 32x over a token budget.
    script = [{"text": "a", "usage": {"input_tokens": 50, "output_tokens": 100}}] * 40
    with ScriptedProvider(script, api_key=KEY, chunk_delay=0.2) as up:
        h = make(harnesses, loop, sockdir, anthropic_policy(up.url), budgets={"tokens": 1000})
        results: list[int] = []

        def one() -> None:
            r = h.http.post("/v1/messages", json={
                "model": "sonnet", "max_tokens": 100, "stream": True,
                "messages": [{"role": "user", "content": "x"}]})
            results.append(r.status_code)

        threads = [threading.Thread(target=one) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        forwarded = len(up.generation_requests())
        # each reserves its 100 output tokens + ~25 estimated input: 8 fit in 1000
        assert forwarded <= 1000 // 100, forwarded
        assert results.count(200) == forwarded
        used = h.budgets.used["tokens"]
        # Over by at most what the input estimate missed (the provider said 50 input
        # tokens for ~100 bytes); the outputs were all reserved.
        assert used <= 1000 + forwarded * 50, used
        assert used < 1.25 * 1000, used
        assert h.budgets.reserved["tokens"] == 0
        assert [t.counter for t in h.tripped] == ["tokens"]


@pytest.mark.parametrize("api", ["anthropic", "chat", "responses"])
def test_a_stream_the_agent_hangs_up_on_is_charged_its_reservation(
        harnesses: list[Harness], loop: LoopThread, sockdir: Path, api: str) -> None:
    # Before: 92 KB of output charged 11 tokens (Chat Completions: 0).
    text = "word " * 20_000
    with ScriptedProvider([{"text": text}], api_key=KEY, chunk_chars=500,
                          chunk_delay=0.01) as up:
        policy = anthropic_policy(up.url) if api == "anthropic" else openai_policy(up.url)
        h = make(harnesses, loop, sockdir, policy, budgets={"tokens": 1_000_000})
        path, body = {
            "anthropic": ("/v1/messages", {"model": "sonnet", "max_tokens": 30_000,
                                           "messages": [{"role": "user", "content": "x"}]}),
            "chat": ("/v1/chat/completions", {"model": "gpt-5", "max_tokens": 30_000,
                                              "messages": [{"role": "user", "content": "x"}]}),
            "responses": ("/v1/responses", {"model": "gpt-5", "max_output_tokens": 30_000,
                                            "input": "x"}),
        }[api]
        with h.http.stream("POST", path, json={**body, "stream": True}) as r:
            got = 0
            for chunk in r.iter_bytes():
                got += len(chunk)
                if got > 20_000:
                    break
        assert wait_for(lambda: h.of("provider.request"), 10)
        assert h.budgets.used["tokens"] >= 30_000, h.budgets.used
        assert h.budgets.reserved["tokens"] == 0


def test_a_request_without_an_output_cap_gets_the_reservation_as_its_cap(
        harnesses: list[Harness], loop: LoopThread, sockdir: Path) -> None:
    with ScriptedProvider([{"text": "a"}] * 3, api_key=KEY) as up:
        h = make(harnesses, loop, sockdir, openai_policy(up.url), budgets={"tokens": 10_000})
        h.openai().responses.create(model="gpt-5", input="x")
        h.openai().chat.completions.create(model="gpt-5", messages=[
            {"role": "user", "content": "x"}])
        gens = up.generation_requests()
        assert 1 <= gens[0].body["max_output_tokens"] < 10_000
        assert 1 <= gens[1].body["max_completion_tokens"] < 10_000
        # a request whose own cap does not fit is refused before it goes upstream
        with pytest.raises(openai.RateLimitError):
            h.openai().responses.create(model="gpt-5", input="x", max_output_tokens=20_000)
        assert len(up.generation_requests()) == 2
        assert h.of("budget.exceeded")[0]["counter"] == "tokens"
