"""Crash and restart at the store level: a host process running a real sandbox is killed
with SIGKILL; on restart `reconcile` removes the sandbox, marks the run lost (or records
its real end when the report was written), closes the log so it verifies, and leaves
queued runs to go on. Runs on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.engines import get_engine
from runner.events.verify import verify_log
from runner.service.store import Quota, open_store
from runner.service.store.reconcile import reconcile, service_status
from tests.conftest import wait_for

# A host process: records the run, claims it, starts it, and runs it to its end.
HOST = """
import sys
from pathlib import Path
from runner.agents import get_agent
from runner.api import load_policy
from runner.run.hostaddrs import host_addresses
from runner.run.orchestrator import Run, RunOptions
from runner.service.store import Quota, open_store

url, host, runs_dir, *command = sys.argv[1:]
store = open_store(url)
run = Run(RunOptions(policy=load_policy("default"), agent=get_agent("command"), task=command,
                     runs_dir=Path(runs_dir), host_addresses=host_addresses()))
store.create_run("acme", {"agent": "command", "command": command}, quota=Quota(),
                 run_id=run.run_id)
assert store.claim_next(host, {}, {}).id == run.run_id
store.mark_started(run.run_id, host, run_dir=str(run.dir))
print(run.run_id, flush=True)
result = run.execute()
print("ended", result.status, flush=True)
sys.stdin.readline()  # killed here, before the store hears of the end
"""


def _host(url: str, runs_dir: Path, *command: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", HOST, url, "host-a", str(runs_dir), *command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "AIRLOCK_NO_REAPER": "1"})
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read()
    return proc, run_id


def _containers_of(engine, run_id: str) -> list[str]:
    return [c.id for c in engine.containers.list(all=True, filters={"label": f"airlock.run={run_id}"})]


@pytest.mark.slow
def test_kill_9_mid_run_then_reconcile(engine, database_url: str, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    proc, run_id = _host(database_url, runs_dir, "sh", "-c", "echo started; sleep 600")
    log = runs_dir / run_id / "events.jsonl"
    try:
        assert wait_for(lambda: log.exists() and '"started' in log.read_text(), 120), \
            proc.stderr.read() if proc.poll() is not None else log.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    store = open_store(database_url)
    try:
        queued = store.create_run("acme", {"agent": "command"}, quota=Quota())
        assert store.get_run(run_id).status == "running"
        assert _containers_of(engine, run_id), "the killed host's sandbox should still exist"
        assert not verify_log(log, run_id=run_id)  # a valid prefix, without an end

        done = reconcile(store, "host-a", get_engine(), runs_dir)
        assert done.lost == [run_id] and done.ended == [] and done.kept == []
        assert done.logs_closed == [run_id] and any(run_id in r for r in done.removed)
        rec = store.get_run(run_id)
        assert rec.status == "lost" and rec.exit_reason == "host_restarted" and rec.ended_at
        assert _containers_of(engine, run_id) == []
        assert verify_log(log, run_id=run_id) == []
        last = json.loads(log.read_text().splitlines()[-1])
        assert last["type"] == "run.end" and last["data"]["status"] == "lost"
        # Queued runs go on; a second reconcile finds nothing more to do.
        assert store.get_run(queued.id).status == "queued"
        again = reconcile(store, "host-a", get_engine(), runs_dir)
        assert again.lost == again.ended == again.removed == again.logs_closed == []
        assert store.claim_next("host-a", {}, {}).id == queued.id
    finally:
        store.close()


@pytest.mark.slow
def test_a_run_that_ended_before_the_kill_gets_its_real_end(engine, database_url: str,
                                                             tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    proc, run_id = _host(database_url, runs_dir, "sh", "-c", "exit 7")
    try:
        line = proc.stdout.readline()
        assert line.startswith("ended"), proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with open_store(database_url) as store:
        assert store.get_run(run_id).status == "running"
        done = reconcile(store, "host-a", get_engine(), runs_dir)
        assert done.ended == [run_id] and done.lost == [] and done.logs_closed == []
        rec = store.get_run(run_id)
        assert (rec.status, rec.exit_code, rec.exit_reason) == ("failed", 7, "command")
        assert rec.usage.get("wall_s", 0) > 0
        report = json.loads((runs_dir / run_id / "report.json").read_text())
        assert verify_log(runs_dir / run_id / "events.jsonl", run_id=run_id, report=report) == []


@pytest.mark.slow
def test_a_run_whose_report_was_never_written_gets_its_end_from_the_log(
        engine, database_url: str, tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    proc, run_id = _host(database_url, runs_dir, "sh", "-c", "exit 5")
    try:
        line = proc.stdout.readline()
        assert line.startswith("ended"), proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    # as if killed after the log's last line but before report.json
    (runs_dir / run_id / "report.json").unlink()
    with open_store(database_url) as store:
        done = reconcile(store, "host-a", get_engine(), runs_dir)
        assert done.ended == [run_id] and done.lost == [] and done.logs_closed == []
        rec = store.get_run(run_id)
        assert (rec.status, rec.exit_code, rec.exit_reason) == ("failed", 5, "command")
        assert verify_log(runs_dir / run_id / "events.jsonl", run_id=run_id) == []


def test_report_statuses_map_onto_the_service_statuses() -> None:
    assert [service_status(s) for s in ("succeeded", "failed", "budget_exceeded", "timeout",
                                        "interrupted", "cancelled", "oom", "not_ready", "disk")] \
        == ["succeeded", "failed", "budget", "timeout", "cancelled", "cancelled", "failed",
            "failed", "failed"]
