"""The readiness gate: every run starts with a self-test inside the sandbox, recorded as
an event, and a failing self-test stops the run with exit 3 unless the policy turns the
gate off."""

from __future__ import annotations

import pytest

from runner import execute
from runner.run.orchestrator import Run
from tests.conftest import RUNTIMES

pytestmark = pytest.mark.usefixtures("engine")

EXPECTED = {"non-root", "no-capabilities", "loopback-only", "no-routes", "external-unreachable",
            "metadata-unreachable", "ipv6-unreachable", "no-dns", "read-only-root", "runtime"}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_selftest_passes_and_is_recorded(tmp_path, runtime):
    events = []
    r = execute(["true"], agent="command", runs_dir=tmp_path, on_event=events.append,
                policy={"extends": "default", "process": {"runtime": runtime}})
    assert r.exit_code == 0
    st = [e for e in events if e.type == "selftest"]
    assert len(st) == 1 and st[0].source == "host" and st[0].data["ok"]
    names = {c["name"] for c in st[0].data["checks"]}
    assert names >= EXPECTED
    assert any(n.startswith("host-unreachable:") for n in names)
    assert st[0].data["runtime"] == runtime


def _expect_wrong_runtime(monkeypatch):
    original = Run._selftest_config

    def wrong(self, bridges):
        cfg = original(self, bridges)
        cfg["runtime"] = "runsc" if self.policy.process.runtime == "runc" else "runc"
        return cfg

    monkeypatch.setattr(Run, "_selftest_config", wrong)


def test_failing_selftest_stops_the_run_with_3(tmp_path, monkeypatch):
    _expect_wrong_runtime(monkeypatch)
    marker = tmp_path / "ran"
    r = execute(["sh", "-c", "echo agent-started"], agent="command", runs_dir=tmp_path,
                on_output=lambda s, b: marker.write_bytes(b))
    assert r.exit_code == 3 and r.status == "not_ready" and r.exit_reason == "selftest"
    assert not marker.exists() or b"agent-started" not in marker.read_bytes()


def test_gate_off_records_the_failure_and_proceeds(tmp_path, monkeypatch):
    _expect_wrong_runtime(monkeypatch)
    events = []
    r = execute(["true"], agent="command", runs_dir=tmp_path, on_event=events.append,
                policy={"extends": "default", "readiness": {"gate": False}})
    assert r.exit_code == 0
    st = [e for e in events if e.type == "selftest"]
    assert st and not st[0].data["ok"]
    assert any(e.type == "policy.widened" and "readiness.gate" in e.data["detail"] for e in events)
