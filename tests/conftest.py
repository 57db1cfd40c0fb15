"""Shared fixtures: the real engine, the `airlock` CLI, canary listeners, probes.

Every test here runs against the real Docker Engine and the real images; nothing about
the boundary is mocked. Tests that need the engine skip only when it is not there at
all, which `make test` rules out by provisioning one first.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.testing.listener import HostListener

# The suite's CLI runs go in-process unless a test starts a server itself: no test
# leaves an auto-started `airlock serve` behind (tests/test_serve.py covers that path),
# and none is handed to the server of the user running the suite (whose code and
# environment may differ): the default socket is moved to a private empty directory.
# Runs land in the suite's own directory, whatever AIRLOCK_RUNS_DIR the user has.
os.environ["AIRLOCK_AUTO_SERVE"] = "0"
_HERMETIC = tempfile.mkdtemp(prefix="airlock-tests-")
os.environ["AIRLOCK_SERVE_SOCKET"] = os.path.join(_HERMETIC, "no-server", "serve.sock")
os.environ["AIRLOCK_RUNS_DIR"] = os.path.join(_HERMETIC, "runs")
atexit.register(shutil.rmtree, _HERMETIC, True)

# A suite started in the background by a shell without job control (`cmd &` in a script,
# `nohup`) inherits SIGINT ignored, and so does every CLI it starts: the Ctrl-C tests'
# SIGINT then does nothing and the run goes on to its end (seen: a 120 s `sleep` ran out).
# The CLI rightly keeps an ignored SIGINT ignored; the suite restores the default, which
# its children get back at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
PROBES = Path(__file__).resolve().parent / "probes"
AIRLOCK = [sys.executable, "-m", "runner.cli"]
RUNTIMES = ["runc", "runsc"]


def engine_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return True
    except Exception:
        return False


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    run_dir: Path | None

    @property
    def report(self) -> dict:
        assert self.run_dir is not None, self.stderr
        return json.loads((self.run_dir / "report.json").read_text())

    def events(self) -> list[dict]:
        assert self.run_dir is not None
        return [json.loads(line) for line in (self.run_dir / "events.jsonl").read_text().splitlines()]

    def probe(self) -> dict:
        """The last JSON object a probe printed on stdout."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise AssertionError(f"no probe output; stdout={self.stdout!r} stderr={self.stderr!r}")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def airlock(runs_dir: Path):
    """Run the real CLI; return its exit code, output and run directory."""

    def call(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
             input: str | None = None) -> Result:
        full_env = {**os.environ, "AIRLOCK_RUNS_DIR": str(runs_dir), **(env or {})}
        before = set(os.listdir(runs_dir))
        proc = subprocess.run([*AIRLOCK, *args], capture_output=True, text=True, env=full_env,
                              timeout=timeout, cwd=ROOT, input=input)
        new = sorted(set(os.listdir(runs_dir)) - before)
        return Result(proc.returncode, proc.stdout, proc.stderr,
                      runs_dir / new[-1] if new else None)

    return call


@pytest.fixture(scope="session")
def engine() -> Iterator[object]:
    if not engine_available():
        pytest.skip("no Docker Engine answers (run `make engine`)")
    import docker

    yield docker.from_env()


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL server for the session (Debian's, on a private socket)."""
    from runner.testing.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'airlock.db'}"
    return request.getfixturevalue("postgres").create_database()


class Canary(HostListener):
    """The host listener every network test starts: it must see no connection."""


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def run_events(result) -> list[dict]:
    """A finished run's event log, as dicts (`runner.execute`'s result)."""
    return [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]


def write_policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _foreign(labels: dict[str, str]) -> bool:
    """A sandbox of a process that was running before this suite started and still runs
    (the user's own per-user server and its pool, say): not the suite's to account for."""
    import socket

    from runner.run.owner import _start_time, owner_alive

    owner = labels.get("airlock.owner", "")
    if owner.rsplit(":", 2)[0] != socket.gethostname():
        return False  # start times compare only on one machine
    try:
        started = int(owner.rsplit(":", 1)[1])
        ours = int(_start_time(os.getpid()) or 0)
    except (IndexError, ValueError):
        return False
    return started < ours and owner_alive(owner)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the suite, nothing labelled by Airlock may remain on the engine."""
    if not engine_available():
        return
    import docker

    def leftovers() -> list[str]:
        api = docker.from_env(timeout=180).api
        label = {"label": "airlock.managed"}
        left = [c["Id"][:12] for c in api.containers(all=True, filters=label)
                if not _foreign(c.get("Labels") or {})]
        left += [n["Id"][:12] for n in api.networks(filters=label)]
        left += [v["Name"] for v in (api.volumes(filters=label) or {}).get("Volumes") or []]
        return left

    try:
        # A reaper that a crash test set off may still be finishing its cleanup.
        deadline = time.monotonic() + 30
        while (left := leftovers()) and time.monotonic() < deadline:
            time.sleep(1)
    except Exception as exc:
        sys.stderr.write(f"\ncould not check for leftovers: {exc}\n")
        session.exitstatus = 1
        return
    if left:
        sys.stderr.write(f"\nLEFT BEHIND by the suite: {left}\n")
        session.exitstatus = 1
