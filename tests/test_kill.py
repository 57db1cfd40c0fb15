"""A run the host ends (wall time, cancel, Ctrl-C, a budget) ends even when the engine
does not take the kill: a loaded engine can answer one with an error ("did not receive
an exit event"), and a run that trusted that one kill lasted as long as its command.

The engine's refusal is the one part replayed (it cannot be caused on demand); the
sandbox, its kill and its removal are real.
"""

from __future__ import annotations

import contextlib

import docker.errors
import pytest

from runner import execute
from runner.engines.docker_engine import DockerSandbox
from runner.policy.loader import policy_from_dict
from tests.conftest import run_events as events

pytestmark = pytest.mark.usefixtures("engine")

REFUSAL = "Cannot kill container: tried to kill container, but did not receive an exit event"



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
    assert (result.exit_code, result.status) == (124, "timeout")  # not engine_lost
    assert result.duration_s < 30  # 2 s, 3 refused kills a second apart, the removal
    assert len(refused) == 3
    log = events(result)
    failed = [(e["data"]["call"], e["data"]["attempt"]) for e in log
              if e["type"] == "sandbox.kill_failed"]
    assert failed == [("kill", 1), ("kill", 2), ("kill", 3)]
    assert "sandbox.abandoned" not in [e["type"] for e in log]  # the removal ended it
    with pytest.raises(docker.errors.NotFound):
        docker.from_env().containers.get(refused[0])


def test_a_sandbox_the_engine_can_neither_kill_nor_remove_is_left_to_gc(tmp_path, monkeypatch):
    refused = refuse_kills(monkeypatch, None)
    real_remove = DockerSandbox.remove

    def remove_refused(self: DockerSandbox) -> None:
        raise docker.errors.APIError("cannot remove container: could not kill")

    monkeypatch.setattr(DockerSandbox, "remove", remove_refused)
    try:
        result = execute(["sleep", "60"], agent="command", policy=wall_time(2),
                         runs_dir=tmp_path)
        assert (result.exit_code, result.status) == (124, "timeout")
        assert result.duration_s < 30  # the host stops waiting: the wall time holds for it
        log = events(result)
        assert [e["data"]["call"] for e in log if e["type"] == "sandbox.kill_failed"] \
            == ["kill", "kill", "kill", "remove"]
        assert "airlock gc" in next(e for e in log if e["type"] == "sandbox.abandoned")[
            "data"]["detail"]
        assert "sandbox.left" in [e["type"] for e in log]  # teardown did not try again
        # Left for gc (it has exited meanwhile: the run's end closed the shim's control
        # connection, the dead-man switch, which a real engine would have to honour).
        docker.from_env().containers.get(refused[0])
    finally:
        monkeypatch.setattr(DockerSandbox, "remove", real_remove)
        for cid in set(refused):
            with contextlib.suppress(docker.errors.NotFound):
                docker.from_env().api.remove_container(cid, force=True)


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_kill_or_removal_of_a_sandbox_already_ended_is_no_error(runtime):
    from runner.engines import get_engine
    from runner.images.build import image_tag

    client = docker.from_env()
    c = client.containers.run(image_tag("base"), ["true"], runtime=runtime, detach=True,
                              network_mode="none")
    sandbox = get_engine().adopt(c.id)
    try:
        c.wait()
        sandbox.kill()  # 409: not running
        sandbox.remove()
        sandbox.kill()  # 404: gone
        sandbox.remove()
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
