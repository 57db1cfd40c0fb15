"""An OOM kill ends a run with 137 whichever the engine reports first, the exit or the kill.

Under gVisor the kernel's OOM killer ends the whole sandbox (one host process holds all
of its memory) while the agent inside may exit 1 on a failed allocation, and the engine
now and then reports the exit (code 1, not OOM-killed) before the OOM event (runsc,
~1 run in 20 under load). That order cannot be forced, so one test replays it: the
kill is real and the engine's events have it, only its inspect answers are made to say
"not OOM-killed", as they did in the runs that raced.
"""

from __future__ import annotations

import contextlib
import json
import os
import socketserver
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import docker
import pytest
from docker.api.client import APIClient

from runner import execute
from runner.engines.docker_engine import DockerSandbox, _unix_time, oom_in_events
from runner.policy.loader import policy_from_dict
from tests.conftest import run_events as events

ALLOCATE = "b = [bytearray(16 << 20) for _ in range(64)]"  # 1 GiB, past 96m



def policy(runtime: str):
    preset = "strict" if runtime == "runsc" else "default"
    return policy_from_dict({"extends": preset, "process": {"runtime": runtime},
                             "resources": {"memory": "96m"}})


@pytest.fixture
def late_oom_calls(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real = DockerSandbox.late_oom

    def spy(self: DockerSandbox, wait: float) -> bool:
        calls.append(real(self, wait))
        return calls[-1]

    monkeypatch.setattr(DockerSandbox, "late_oom", spy)
    return calls


@pytest.mark.usefixtures("engine")
def test_an_oom_kill_heard_after_the_exit_still_ends_with_137(tmp_path, monkeypatch,
                                                               late_oom_calls):
    real_inspect = APIClient.inspect_container

    def inspect_before_the_oom(self: APIClient, container: str) -> dict:
        # What the engine answers (to wait() and to the second look) before it has
        # handled the OOM event: not OOM-killed.
        info = real_inspect(self, container)
        info["State"]["OOMKilled"] = False
        return info

    monkeypatch.setattr(APIClient, "inspect_container", inspect_before_the_oom)
    result = execute(["python3", "-c", ALLOCATE], agent="command", policy=policy("runsc"),
                     runs_dir=tmp_path)
    assert late_oom_calls == [True]  # found in the engine's events, not its inspect
    assert (result.exit_code, result.status) == (137, "oom"), result.error
    log = events(result)
    kinds = [e["type"] for e in log]
    exited = next(e for e in log if e["type"] == "sandbox.exited")["data"]
    assert exited["oom_killed"] is False
    late = next(e for e in log if e["type"] == "sandbox.oom_killed")
    assert late["data"]["exit_code"] == exited["code"]
    assert kinds.index("sandbox.exited") < kinds.index("sandbox.oom_killed")


@pytest.mark.usefixtures("engine")
def test_a_sandbox_killed_from_outside_is_not_taken_for_an_oom(tmp_path, late_oom_calls):
    client = docker.from_env()
    container: list[str] = []

    def kill_once_started(event) -> None:
        if event.type in ("sandbox.created", "sandbox.claimed"):
            container.append(event.data["container"])
        elif event.type == "agent.started":
            threading.Thread(target=lambda: client.containers.get(container[0]).kill(),
                             daemon=True).start()

    result = execute(["sleep", "60"], agent="command", policy=policy("runsc"),
                     runs_dir=tmp_path, on_event=kill_once_started)
    assert late_oom_calls == [False]  # asked, and no OOM kill found
    assert result.status != "oom" and result.exit_code != 0, (result.status, result.exit_code)
    assert "sandbox.oom_killed" not in [e["type"] for e in events(result)]


@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_failing_command_keeps_its_own_exit(runtime, tmp_path, late_oom_calls):
    result = execute(["sh", "-c", "exit 3"], agent="command", policy=policy(runtime),
                     runs_dir=tmp_path)
    assert (result.exit_code, result.status) == (3, "failed")
    # Only gVisor's failures take the second look; runc's OOM kills are heard first.
    assert late_oom_calls == ([False] if runtime == "runsc" else [])


@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_the_engine_replays_an_oom_event_asked_for_after_the_exit(runtime):
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
            assert oom_in_events(client.api, c.id, end, 0.5) is oom, (runtime, command)
        finally:
            c.remove(force=True)


# -- engines that misbehave: a stand-in on a unix socket, since a real one will not ----------

ME = "c0ffee" * 10 + "beef"


class _Engine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    mode = "silent"


class _Events(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "no-headers":
            time.sleep(30)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        other = {"Type": "container", "Action": "oom", "Actor": {"ID": "f" * 64}, "time": 1}
        mine = {"Type": "container", "Action": "oom", "Actor": {"ID": ME}, "time": 1}
        with contextlib.suppress(OSError):
            if mode == "oom":
                self._chunk(mine)
            elif mode == "others":  # an engine that ignores the filter, forever
                while True:
                    self._chunk(other)
                    time.sleep(0.05)
            time.sleep(30)  # then silence, the stream left open

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


@pytest.fixture
def stand_in() -> Iterator[tuple[_Engine, APIClient]]:
    sock = Path(tempfile.mkdtemp(prefix="airlock-oom-")) / "engine.sock"
    server = _Engine(str(sock), _Events)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, APIClient(base_url=f"unix://{sock}", version="1.41")
    finally:
        server.shutdown()
        server.server_close()
        os.unlink(sock)
        os.rmdir(sock.parent)


@pytest.mark.parametrize("mode, found", [("oom", True), ("silent", False), ("others", False),
                                         ("no-headers", False)])
def test_a_misbehaving_engine_holds_the_run_for_a_bounded_time(stand_in, mode, found):
    server, api = stand_in
    server.mode = mode
    t0 = time.monotonic()
    assert oom_in_events(api, ME, time.time(), 0.3) is found
    assert time.monotonic() - t0 < 5  # 2 x wait at most, with slack for a loaded host


def test_the_engine_time_parses_with_nanoseconds():
    assert _unix_time("2026-12-06T21:37:41.769073492Z") == pytest.approx(1796593061.769073492)
    assert _unix_time("2026-12-06T21:37:41Z") == 1796593061.0
    assert _unix_time("0001-01-01T00:00:00Z") is None  # never ended
    assert _unix_time("2026-12-06T21:37:41.5+01:00") is None
    assert _unix_time("") is None
