"""An OOM kill ends a run with 137 whichever the engine reports first, the exit or the kill.

Under gVisor the kernel's OOM killer ends the whole sandbox (one host process holds all
of its memory) while the agent inside may exit 1 on a failed allocation, and the engine
now and then tells of the exit (code 1, not OOM-killed) before the OOM event (runsc,
~1 run in 20 under load).
That order cannot be forced, so one test replays it: the engine's real answer to
`wait()` is kept, only its news of the kill is held back, and the run must find it.
"""

from __future__ import annotations

import json
import threading

import docker
import pytest

from runner import execute
from runner.engines.base import Exit
from runner.engines.docker_engine import DockerSandbox, _unix_time, oom_event
from runner.policy.loader import policy_from_dict

pytestmark = pytest.mark.usefixtures("engine")

ALLOCATE = "b = [bytearray(16 << 20) for _ in range(64)]"  # 1 GiB, past 96m


def events(result) -> list[dict]:
    return [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]


def gvisor_policy():
    return policy_from_dict({"extends": "strict", "resources": {"memory": "96m"}})


def test_an_oom_kill_heard_after_the_exit_still_ends_with_137(tmp_path, monkeypatch):
    real_wait = DockerSandbox.wait
    heard: list[Exit] = []

    def wait_hearing_the_exit_first(self: DockerSandbox) -> Exit:
        exit_ = real_wait(self)
        heard.append(exit_)
        # What the engine said in the runs that raced: exit 1, no OOM kill (yet).
        return Exit(code=1, oom_killed=False) if exit_.oom_killed else exit_

    monkeypatch.setattr(DockerSandbox, "wait", wait_hearing_the_exit_first)
    result = execute(["python3", "-c", ALLOCATE], agent="command", policy=gvisor_policy(),
                     runs_dir=tmp_path)
    assert heard and heard[0].oom_killed, heard  # the engine did see an OOM kill
    assert (result.exit_code, result.status) == (137, "oom"), result.error
    kinds = [e["type"] for e in events(result)]
    late = next(e for e in events(result) if e["type"] == "sandbox.oom_killed")
    assert late["data"]["exit_code"] == 1
    assert kinds.index("sandbox.exited") < kinds.index("sandbox.oom_killed")


def test_a_sandbox_killed_from_outside_is_not_taken_for_an_oom(tmp_path):
    # The same second look (a gVisor sandbox ended with a failure), with no OOM kill:
    # it must find none.
    client = docker.from_env()

    def kill_once_started(event) -> None:
        if event.type == "agent.started":
            threading.Thread(target=lambda: client.containers.get(container[0]).kill(),
                             daemon=True).start()
        elif event.type in ("sandbox.created", "sandbox.claimed"):
            container.append(event.data["container"])

    container: list[str] = []
    result = execute(["sleep", "60"], agent="command", policy=gvisor_policy(),
                     runs_dir=tmp_path, on_event=kill_once_started)
    assert result.status != "oom" and result.exit_code != 0, (result.status, result.exit_code)
    assert "sandbox.oom_killed" not in [e["type"] for e in events(result)]


def test_a_failing_command_reports_its_own_exit_and_no_oom(tmp_path):
    result = execute(["sh", "-c", "exit 3"], agent="command", policy=gvisor_policy(),
                     runs_dir=tmp_path)
    assert (result.exit_code, result.status) == (3, "failed")
    assert "sandbox.oom_killed" not in [e["type"] for e in events(result)]


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_the_engine_keeps_an_oom_event_to_be_asked_for_after_the_exit(runtime):
    from runner.images.build import image_tag

    client = docker.from_env()
    for command, oom in ((["python3", "-c", ALLOCATE], True), (["sh", "-c", "exit 1"], False)):
        c = client.containers.run(image_tag("base"), command, runtime=runtime, detach=True,
                                  mem_limit="96m", memswap_limit="96m", network_mode="none")
        try:
            c.wait()
            c.reload()
            end = _unix_time(c.attrs["State"]["FinishedAt"])
            assert end is not None
            assert oom_event(client.api, c.id, end, 0.5) is oom, (runtime, command)
        finally:
            c.remove(force=True)


def test_the_engine_time_parses_with_nanoseconds():
    assert _unix_time("2026-12-06T21:37:41.769073492Z") == pytest.approx(1796593061.769073492)
    assert _unix_time("2026-12-06T21:37:41Z") == 1796593061.0
    assert _unix_time("2026-12-06T21:37:41.5+01:00") is None
    assert _unix_time("") is None
