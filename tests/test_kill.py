"""A run the host ends (wall time, cancel, Ctrl-C, a budget) ends even when the engine
does not take the kill: a loaded engine can answer one with an error ("did not receive
an exit event"), and a run that trusted that one kill lasted as long as its command.

The engine's refusal is the one part replayed (it cannot be caused on demand); the
sandbox, its kill and its removal are real.
"""

from __future__ import annotations

import json

import docker.errors
import pytest

from runner import execute
from runner.engines.docker_engine import DockerSandbox
from runner.policy.loader import policy_from_dict

pytestmark = pytest.mark.usefixtures("engine")

REFUSAL = "Cannot kill container: tried to kill container, but did not receive an exit event"


def events(result) -> list[dict]:
    return [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]


def refuse_kills(monkeypatch, times: int | None) -> list[str]:
    """The engine answers the first `times` kills (all, with None) with its error."""
    real_kill = DockerSandbox.kill
    refused: list[str] = []

    def kill(self: DockerSandbox) -> None:
        if times is None or len(refused) < times:
            refused.append(self.id)
            raise docker.errors.APIError(REFUSAL)
        real_kill(self)

    monkeypatch.setattr(DockerSandbox, "kill", kill)
    return refused


def wall_time(seconds: int):
    return policy_from_dict({"extends": "default", "resources": {"wall_time": f"{seconds}s"}})


def test_the_wall_time_holds_when_the_engine_refuses_the_first_kill(tmp_path, monkeypatch):
    refused = refuse_kills(monkeypatch, 1)
    result = execute(["sleep", "60"], agent="command", policy=wall_time(2), runs_dir=tmp_path)
    assert (result.exit_code, result.status) == (124, "timeout")
    assert result.duration_s < 20  # the second kill, 2 s on; one kill alone ran all 60 s
    assert len(refused) == 1
    failed = [e["data"] for e in events(result) if e["type"] == "sandbox.kill_failed"]
    assert len(failed) == 1 and REFUSAL in failed[0]["error"] and failed[0]["attempt"] == 1


def test_a_sandbox_no_kill_ends_is_removed(tmp_path, monkeypatch):
    refused = refuse_kills(monkeypatch, None)
    result = execute(["sleep", "60"], agent="command", policy=wall_time(2), runs_dir=tmp_path)
    assert (result.exit_code, result.status) == (124, "timeout")
    assert result.duration_s < 40  # 2 s, then kills at 0, 2 and 6 s, removal at 12 s
    assert len(refused) == 3
    log = events(result)
    failed = [e["data"] for e in log if e["type"] == "sandbox.kill_failed"]
    assert [f["attempt"] for f in failed] == [1, 2, 3]
    assert [e["data"]["detail"] for e in log if e["type"] == "sandbox.force_removed"] \
        == ["still running after 3 kills"]
    client = docker.from_env()
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(refused[0])
