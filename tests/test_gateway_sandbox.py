"""The provider gateway as the agent inside sees it: the official SDKs work through it,
the real key never enters the sandbox, the policy is enforced, streams are not buffered,
and a recorded run replays offline."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from runner.testing.scripted_provider import ScriptedProvider
from tests.conftest import AIRLOCK, PROBES, ROOT, write_policy

pytestmark = [pytest.mark.usefixtures("engine", "builtin_image")]
REAL_KEY = "sk-ant-real-key-" + "x" * 24


@pytest.fixture(scope="session")
def builtin_image(engine) -> str:
    out = subprocess.run([*AIRLOCK, "images", "build", "builtin"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def policy_for(tmp_path, url: str, backend: str = "anthropic", extra: str = "") -> str:
    models = ("{default: claude-sonnet-4-5, triage: claude-haiku-4-5}" if backend == "anthropic"
              else "{default: gpt-5}")
    if backend == "openai":
        url += "/v1"  # OpenAI-style base URLs name the API version, as the SDK's do
    return write_policy(tmp_path, f"""\
extends: default
provider:
  backend: {backend}
  base_url: {url}
  api_key_env: AIRLOCK_TEST_PROVIDER_KEY
  models: {models}
{extra}""")


def sdk(airlock, policy: str, *args: str, env: dict | None = None, record: str | None = None):
    extra = ["--record", record] if record else []
    return airlock("run", "--quiet", "--policy", policy, "--image", "builtin", *extra,
                   "--workspace", str(PROBES), "--", "python3", "-I", "/workspace/sdk_client.py",
                   *args, env={"AIRLOCK_TEST_PROVIDER_KEY": REAL_KEY, **(env or {})})


def test_anthropic_sdk_streaming_and_not_through_the_gateway(airlock, tmp_path):
    with ScriptedProvider(["hello plain", "hello streamed"], api_key=REAL_KEY,
                          chunk_chars=3) as up:
        r = sdk(airlock, policy_for(tmp_path, up.url), "anthropic")
        assert r.code == 0, r.stderr
        out = r.probe()
        assert out == {"plain": "hello plain", "stream": "hello streamed",
                       "model": "claude-sonnet-4-5"}
        # The upstream got the real key; the role `default` arrived as the full id.
        gens = up.generation_requests()
        assert [g.header("x-api-key") for g in gens] == [REAL_KEY, REAL_KEY]
        assert gens[0].body["model"] == "claude-sonnet-4-5"
    reqs = [e for e in r.events() if e["type"] == "provider.request"]
    assert len(reqs) == 2 and all(e["source"] == "gateway" for e in reqs)
    assert reqs[1]["data"]["output_tokens"] and reqs[1]["data"]["status"] == 200
    assert REAL_KEY not in (r.run_dir / "events.jsonl").read_text()


@pytest.mark.parametrize("api", ["openai-responses", "openai-chat"])
def test_openai_sdk_through_the_gateway(airlock, tmp_path, api):
    with ScriptedProvider(["one", "two"], api_key=REAL_KEY) as up:
        r = sdk(airlock, policy_for(tmp_path, up.url, "openai"), api)
        assert r.code == 0, r.stderr
        assert r.probe() == {"plain": "one", "stream": "two"}
        assert all(g.header("authorization") == f"Bearer {REAL_KEY}"
                   for g in up.generation_requests())


def test_the_key_never_enters_the_sandbox(airlock, tmp_path):
    with ScriptedProvider(["x"], api_key=REAL_KEY) as up:
        # Handed over reversed, so the probe's own argv does not carry what it looks for.
        r = sdk(airlock, policy_for(tmp_path, up.url), "secrets", REAL_KEY[::-1])
    out = r.probe()
    assert out["found"] == []
    assert out["placeholder"] and out["placeholder"] != REAL_KEY


def test_refusals_are_events(airlock, tmp_path):
    with ScriptedProvider(["never served"] * 3, api_key=REAL_KEY) as up:
        policy = policy_for(tmp_path, up.url)
        model = sdk(airlock, policy, "refused", "model").probe()
        hosted = sdk(airlock, policy, "refused", "hosted").probe()
        url = sdk(airlock, policy, "refused", "url")
        path = sdk(airlock, policy, "raw", "POST", "/v1/files").probe()
        assert up.generation_requests() == []
    assert model["outcome"] == 403 and hosted["outcome"] == 403
    assert url.probe()["outcome"] == 403
    refused = [e["data"] for e in url.events() if e["type"] == "provider.refused"]
    assert [r["reason"] for r in refused] == ["url_source"]
    assert path["status"] in (403, 404)


def test_request_budget_exceeded_ends_the_run_with_4(airlock, tmp_path):
    with ScriptedProvider(["a", "b", "c"], api_key=REAL_KEY) as up:
        policy = policy_for(tmp_path, up.url, extra="budgets: {requests: 1}\n")
        r = sdk(airlock, policy, "anthropic")
    assert r.code == 4, (r.code, r.stderr)
    types = [e["type"] for e in r.events()]
    assert "budget.exceeded" in types


def test_chunks_arrive_as_the_upstream_sends_them(airlock, tmp_path):
    with ScriptedProvider(["abcdefghij"], api_key=REAL_KEY, chunk_chars=1, chunk_delay=0.3) as up:
        r = sdk(airlock, policy_for(tmp_path, up.url), "slow")
    out = r.probe()
    assert out["chunks"] >= 5
    assert out["last"] - out["first"] > 2.0, out  # the first chunk came long before the last


def test_record_then_replay_offline(airlock, tmp_path):
    rec = tmp_path / "rec.jsonl"
    with ScriptedProvider(["recorded plain", "recorded stream"], api_key=REAL_KEY) as up:
        first = sdk(airlock, policy_for(tmp_path, up.url), "anthropic", record=str(rec))
    assert first.code == 0, first.stderr
    assert REAL_KEY not in rec.read_text()
    replay = write_policy(tmp_path, f"""\
extends: default
provider:
  backend: replay
  replay_file: {rec}
  models: {{default: claude-sonnet-4-5}}
""", "replay.yaml")
    again = sdk(airlock, replay, "anthropic", env={"AIRLOCK_TEST_PROVIDER_KEY": ""})
    assert again.code == 0, again.stderr
    assert again.probe() == first.probe()


def test_two_runs_cannot_reach_each_others_gateway(airlock, tmp_path):
    with ScriptedProvider(["x"] * 4, api_key=REAL_KEY) as up:
        policy = policy_for(tmp_path, up.url)
        a = subprocess.Popen([*AIRLOCK, "run", "--quiet", "--policy", policy, "--", "sleep", "15"],
                             cwd=ROOT, env={**os.environ, "AIRLOCK_TEST_PROVIDER_KEY": REAL_KEY,
                                            "AIRLOCK_RUNS_DIR": str(tmp_path)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            r = airlock("run", "--quiet", "--policy", "default", "--", "python3", "-c",
                        "import glob, json; print(json.dumps(glob.glob('/run/airlock/*')))")
            seen = json.loads(r.stdout.strip().splitlines()[-1])
            assert not any(p.endswith("provider.sock") for p in seen)
        finally:
            a.send_signal(2)
            a.wait(timeout=30)
