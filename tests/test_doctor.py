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


def _fake_runsc(tmp_path, version: str) -> str:
    path = tmp_path / f"runsc-{version}"
    path.write_text(f"#!/bin/sh\necho 'runsc version {version}'\necho 'spec: 1.0.2-dev'\n")
    path.chmod(0o755)
    return str(path)


def test_an_older_gvisor_is_named_with_its_limit_and_the_fix(tmp_path):
    from runner.doctor import GVISOR_FIX, gvisor_finding

    fit, message = gvisor_finding(_fake_runsc(tmp_path, "0.0~20221219.0"))
    assert not fit
    assert "gVisor 20221219" in message and "Invalid argument" in message and "statx" in message
    assert "scripts/fetch-runsc.sh" in GVISOR_FIX
    new = gvisor_finding(_fake_runsc(tmp_path, "0.0~20240729.0"))
    assert new == (True, "runtime runsc is gVisor 20240729")
    assert gvisor_finding(_fake_runsc(tmp_path, "release-20250106.0"))[0]
    assert gvisor_finding(str(tmp_path / "absent"))[0]


def test_the_engine_this_suite_runs_on_has_a_fit_gvisor(airlock):
    """`make engine` registers a runsc whose statx works (scripts/fetch-runsc.sh)."""
    r = airlock("doctor")
    assert "ok    runtime runsc is gVisor 2" in r.stdout, r.stdout
