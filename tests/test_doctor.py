"""`airlock doctor`: the engine, images, and the provider's readiness with each fix."""

from __future__ import annotations

import pytest

from runner.testing.scripted_provider import ScriptedProvider
from tests.conftest import write_policy

pytestmark = pytest.mark.usefixtures("engine")
KEY = "sk-doctor-test-key"


def policy(tmp_path, url: str, models: str = "{default: claude-sonnet-4-5}") -> str:
    return write_policy(tmp_path, f"""\
extends: default
provider:
  backend: anthropic
  base_url: {url}
  api_key_env: AIRLOCK_DOCTOR_KEY
  models: {models}
""")


def test_engine_and_runtimes_are_reported(airlock):
    r = airlock("doctor")
    assert "ok    engine: Docker" in r.stdout
    assert "runtime runsc registered" in r.stdout
    assert "free disk" in r.stdout


def test_missing_credential_and_missing_default_model(airlock, tmp_path):
    r = airlock("doctor", "-p", policy(tmp_path, "http://127.0.0.1:9", "{triage: x}"),
                env={"AIRLOCK_DOCTOR_KEY": ""})
    assert r.code == 3
    assert "FAIL  backend anthropic has no default model" in r.stdout
    assert "provider key is missing" in r.stdout and "fix:" in r.stdout


def test_probe_tells_auth_failure_from_unavailable_model(airlock, tmp_path):
    with ScriptedProvider(["pong"] * 3, api_key=KEY, models=["claude-sonnet-4-5"],
                          strict_models=True) as up:
        good = airlock("doctor", "--probe", "-p", policy(tmp_path, up.url),
                       env={"AIRLOCK_DOCTOR_KEY": KEY})
        assert "ok    probe: anthropic answered with model claude-sonnet-4-5" in good.stdout
        wrong_key = airlock("doctor", "--probe", "-p", policy(tmp_path, up.url),
                            env={"AIRLOCK_DOCTOR_KEY": "sk-wrong"})
        assert "probe: the provider refused the credential (authentication failed)" in wrong_key.stdout
        no_model = airlock("doctor", "--probe", "-p",
                           policy(tmp_path, up.url, "{default: claude-opus-9}"),
                           env={"AIRLOCK_DOCTOR_KEY": KEY})
        assert "probe: the model is not available to this account" in no_model.stdout
        assert "provider.models.default" in no_model.stdout
    assert wrong_key.code == 3 and no_model.code == 3
