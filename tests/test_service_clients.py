"""The clients against a real service (`airlock serve --config`, started as an operator
would) and real sandboxes: the Python client (sync, async, SSE and JSON lines, typed
errors), `airlock remote ...` and `airlock run --server` with a local run's exit codes;
then kill -9 of a service mid-run and its restart, and two services sharing one
PostgreSQL database."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from runner.client import (
    AsyncClient,
    Client,
    Forbidden,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from runner.events.verify import verify_log
from tests.conftest import AIRLOCK, wait_for

pytest.importorskip("runner.service.serve", reason="the service is not in this tree yet")
pytestmark = pytest.mark.slow

TENANTS = ("acme", "globex")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    config: Path
    runs_dir: Path
    url: str
    keys: dict[str, str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    runs: list[str] = field(default_factory=list)

    def start(self) -> Service:
        assert self.log is not None
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([*AIRLOCK, "serve", "--config", str(self.config)],
                                         stdout=fh, stderr=subprocess.STDOUT, env=self.env)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited: {self.log.read_text()[-3000:]}")
            try:
                return Client(self.url, "").health() is not None
            except Unavailable:
                return False

        assert wait_for(up, 90, 0.2), self.log.read_text()[-3000:]
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.kill9()

    def client(self, tenant: str = "acme") -> Client:
        return Client(self.url, self.keys[tenant])


def make_service(tmp: Path, database: str, *, name: str = "a", capacity: int = 2,
                 quota: str = "{}", lease_ttl: float = 30, host_id: str | None = None,
                 extra_env: dict[str, str] | None = None,
                 keys: dict[str, str] | None = None) -> Service:
    root = tmp / name
    root.mkdir(parents=True, exist_ok=True)
    keys = keys or {t: "alk_" + secrets.token_hex(20) for t in TENANTS}
    port = _free_port()
    tenants = "".join(
        f"  {t}:\n    api_key_sha256: {hashlib.sha256(k.encode()).hexdigest()}\n"
        f"    floor: default\n    weight: 1\n    quota: {quota}\n" for t, k in keys.items())
    config = root / "airlock.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\ndatabase: {database}\n"
                      f"runs_dir: {root / 'runs'}\ncapacity: {{runs: {capacity}}}\n"
                      f"lease_ttl: {lease_ttl}\ntenants:\n{tenants}")
    env = {**os.environ, "AIRLOCK_HOST_ID": host_id or f"host-{name}", **(extra_env or {})}
    return Service(config, root / "runs", f"http://127.0.0.1:{port}", keys, env,
                   log=root / "service.log")


@pytest.fixture
def service(tmp_path: Path, database_url: str):
    svc = make_service(tmp_path, database_url).start()
    yield svc
    svc.stop()


def remote(svc: Service, *args: str, key: str | None = None, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AIRLOCK_KEY": svc.keys["acme"] if key is None else key,
           "AIRLOCK_AUTO_SERVE": "0"}
    return subprocess.run([*AIRLOCK, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _said(log: Path, text: str) -> bool:
    """The run's agent printed `text` (its own output, not the task in run.start)."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return False
    return any(e["type"] == "agent.output" and text in e["data"].get("text", "")
               for e in map(json.loads, lines))


def _containers(engine, run_id: str) -> list[str]:
    return [c.id for c in engine.containers.list(all=True, filters={"label": f"airlock.run={run_id}"})]


def test_python_client_streams_events_and_maps_errors(service: Service) -> None:
    with service.client() as c:
        run = c.submit(command=["sh", "-c", "echo one; echo two >&2; exit 3"])
        assert run.status in ("queued", "running")
        sse = list(c.events(run.id))
        jsonl = list(c.events(run.id, format="jsonl"))
        assert [e.seq for e in sse] == list(range(1, len(sse) + 1)) and sse[-1].type == "run.end"
        assert [e.model_dump() for e in sse] == [e.model_dump() for e in jsonl]
        out = "".join(e.data.get("text", "") for e in sse if e.type == "agent.output")
        assert "one" in out and "two" in out
        info = c.wait(run.id, timeout=60)
        assert (info.status, info.exit_code, info.cli_exit_code) == ("failed", 3, 3)
        assert any(r.id == run.id for r in c.list())
        assert isinstance(c.usage(), dict)
        with pytest.raises(Forbidden, match="workspace"):
            c.submit(command=["true"], policy={"filesystem": {"workspace": "rw"}})
    with service.client("globex") as other, pytest.raises(NotFound):
        other.get(run.id)
    with Client(service.url, "alk_wrong") as bad, pytest.raises(Unauthorized):
        bad.get(run.id)
    with Client(service.url, "") as none, pytest.raises(Unauthorized):
        none.list()


def test_async_client(service: Service) -> None:
    async def go() -> tuple[list[str], str]:
        async with AsyncClient(service.url, service.keys["globex"]) as c:
            run = await c.submit(command=["sh", "-c", "echo async"])
            types = [e.type async for e in c.events(run.id, format="jsonl")]
            return types, (await c.wait(run.id, timeout=60)).status

    types, status = asyncio.run(go())
    assert types[0] == "run.start" and types[-1] == "run.end" and status == "succeeded"


def test_cli_remote_has_local_exit_codes(service: Service) -> None:
    r = remote(service, "remote", "run", "--server", service.url, "--", "sh", "-c", "echo hi; exit 7")
    assert r.returncode == 7 and "hi" in r.stdout, r.stderr
    r = remote(service, "run", "--server", service.url, "--", "true")
    assert r.returncode == 0, r.stderr
    policy = service.config.parent / "wide.yaml"
    policy.write_text("filesystem:\n  workspace: rw\n")
    r = remote(service, "remote", "run", "--server", service.url, "--policy", str(policy), "--", "true")
    assert r.returncode == 2 and "403" in r.stderr and "workspace" in r.stderr
    r = remote(service, "remote", "status", "--server", service.url, "nope", key="alk_wrong")
    assert r.returncode == 2 and "401" in r.stderr
    r = remote(service, "remote", "run", "--server", "127.0.0.1:1", "--", "true")
    assert r.returncode == 3 and "did not answer" in r.stderr and "; fix: check that --server" \
        in r.stderr, r.stderr
    # A detached run: its events followed, its status, then cancel a long one.
    r = remote(service, "remote", "run", "-d", "--server", service.url, "--", "sh", "-c", "echo detached")
    run_id = r.stdout.strip()
    assert r.returncode == 0 and run_id
    r = remote(service, "remote", "events", "--follow", "--json", "--server", service.url, run_id)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 0 and events[-1]["type"] == "run.end"
    status = remote(service, "remote", "status", "--server", service.url, run_id)
    assert json.loads(status.stdout)["status"] == "succeeded"
    r = remote(service, "remote", "run", "-d", "--server", service.url, "--", "sleep", "600")
    long_id = r.stdout.strip()
    with service.client() as c:
        assert wait_for(lambda: c.get(long_id).status == "running", 120)
        assert remote(service, "remote", "cancel", "--server", service.url, long_id).returncode == 0
        assert c.wait(long_id, timeout=120).status == "cancelled"
    r = remote(service, "remote", "usage", "--server", service.url)
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict)


def test_cli_remote_says_why_a_run_could_not_go_on() -> None:
    """A run the host ended with an error (a missing runtime, say): the reason and its fix
    on stderr, as a local run prints them; an agent cannot print a host's error line."""
    import io

    from runner.client.cli import _print_event
    from runner.client.models import RunEvent

    def printed(source: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        event = RunEvent(seq=3, ts=0.0, run_id="r", type="run.error", source=source,
                         data={"error": "the engine has no runtime 'runsc'; fix: register it"})
        _print_event(event, False, out, err)
        assert out.getvalue() == ""
        return err.getvalue()

    assert printed("host") == "airlock: the engine has no runtime 'runsc'; fix: register it\n"
    assert printed("agent") == ""


def test_quota_is_a_typed_429(tmp_path: Path, database_url: str) -> None:
    svc = make_service(tmp_path, database_url, capacity=1,
                       quota="{concurrent: 1, queued: 1}").start()
    try:
        with svc.client() as c:
            first = c.submit(command=["sleep", "600"])
            assert wait_for(lambda: c.get(first.id).status == "running", 120)
            c.submit(command=["true"])
            with pytest.raises(QuotaExceeded) as exc:
                c.submit(command=["true"])
            assert exc.value.retry_after_s and exc.value.exit_code == 4
            r = remote(svc, "remote", "run", "--server", svc.url, "--", "true")
            assert r.returncode == 4 and "429" in r.stderr
            c.cancel(first.id)
    finally:
        svc.stop()


def test_a_backlog_delays_another_tenant_by_one_slot(tmp_path: Path, database_url: str) -> None:
    from runner.service.store import open_store

    svc = make_service(tmp_path, database_url, capacity=1).start()
    try:
        with svc.client("acme") as acme, svc.client("globex") as globex:
            backlog = [acme.submit(command=["sh", "-c", "sleep 1"]) for _ in range(6)]
            assert wait_for(lambda: acme.get(backlog[0].id).status == "running", 120)
            late = globex.submit(command=["true"])
            assert globex.wait(late.id, timeout=300).status == "succeeded"
            with open_store(database_url) as store:
                order = sorted((r.claimed_at or float("inf"), r.id)
                               for r in (store.get_run(x.id) for x in [*backlog, late]))
            # The newcomer started right after the run that held the slot, not after
            # the backlog; the backlog then went on in its own order.
            assert [rid for _, rid in order[:2]] == [backlog[0].id, late.id]
            for run in backlog:
                acme.cancel(run.id)
    finally:
        svc.stop()


def test_kill_9_of_the_service_and_restart(engine, tmp_path: Path, database_url: str) -> None:
    # No reaper: the restarted service itself must remove what the killed one left.
    svc = make_service(tmp_path, database_url, capacity=1,
                       extra_env={"AIRLOCK_NO_REAPER": "1"}).start()
    try:
        # A CLI follows the run through the crash: it resumes the stream when the
        # service is back, and ends with the exit code of a lost run.
        follower = subprocess.Popen(
            [*AIRLOCK, "remote", "run", "--server", svc.url, "--", "sh", "-c",
             "echo started; sleep 600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "AIRLOCK_KEY": svc.keys["acme"]})
        first = follower.stderr.readline()
        assert first.startswith("airlock: run "), first + follower.stderr.read()
        with svc.client() as c:
            started = c.get(first.split()[2])
            queued = c.submit(command=["sh", "-c", "echo after"])
            log = svc.runs_dir / "acme" / started.id / "events.jsonl"
            assert wait_for(lambda: _said(log, "started"), 120)
            svc.kill9()
            # The sandbox outlives its killed service, unless another `airlock run` on this
            # machine has collected it already (its owner is dead).
            assert verify_log(log, run_id=started.id) == []
            svc.start()
            assert c.get(started.id).status == "lost"
            assert _containers(engine, started.id) == []
            assert verify_log(log, run_id=started.id) == []
            after = c.wait(queued.id, timeout=180)
            assert after.status == "succeeded"
            qlog = svc.runs_dir / "acme" / queued.id / "events.jsonl"
            report = json.loads((qlog.parent / "report.json").read_text())
            assert verify_log(qlog, run_id=queued.id, report=report) == []
            out, err = follower.communicate(timeout=120)
            assert follower.returncode == 3 and "started" in out, err
            assert f"run {started.id} lost" in err
    finally:
        if follower.poll() is None:
            follower.kill()
        svc.stop()


def test_two_hosts_share_one_postgresql_queue(engine, tmp_path: Path, postgres) -> None:
    from runner.service.store import open_store

    url = postgres.create_database()
    ttl = 3.0
    a = make_service(tmp_path, url, name="a", capacity=1, lease_ttl=ttl).start()
    # The same tenants and keys on both hosts; its own port and run directory.
    b = make_service(tmp_path, url, name="b", capacity=1, lease_ttl=ttl, keys=a.keys,
                     extra_env={"AIRLOCK_NO_REAPER": "1"}).start()
    store = open_store(url)
    try:
        with a.client() as ca, b.client() as cb:
            # Two long runs submitted to one host: each host takes one.
            r1 = ca.submit(command=["sh", "-c", "echo one; sleep 600"])
            r2 = ca.submit(command=["sh", "-c", "echo two; sleep 600"])
            assert wait_for(lambda: {store.get_run(r1.id).status, store.get_run(r2.id).status}
                            == {"running"}, 120)
            hosts = {store.get_run(r.id).host_id: r.id for r in (r1, r2)}
            assert set(hosts) == {"host-a", "host-b"}
            on_b = hosts["host-b"]
            # Either host answers for any run of the tenant.
            assert cb.get(hosts["host-a"]).status == "running"
            assert wait_for(lambda: _containers(engine, on_b) != [], 60)
            b.kill9()
            t0 = time.monotonic()
            assert wait_for(lambda: ca.get(on_b).status == "lost", 4 * ttl + 10)
            assert time.monotonic() - t0 <= 4 * ttl + 10
            # (Its sandbox may already be gone: any `airlock run` on this machine collects
            # the objects of processes that are dead, and the shared engine has many.)
            b.start()  # it comes back: its containers are removed
            assert wait_for(lambda: _containers(engine, on_b) == [], 30)
            assert store.get_run(on_b).status == "lost"
            for run_id in hosts.values():
                ca.cancel(run_id)
    finally:
        store.close()
        a.stop()
        b.stop()


def test_an_unreachable_database_url_is_refused(tmp_path: Path) -> None:
    svc = make_service(tmp_path, f"postgresql://nobody@/none?host={tmp_path}&port=1")
    proc = subprocess.run([*AIRLOCK, "serve", "--config", str(svc.config)], capture_output=True,
                          text=True, env=svc.env, timeout=60)
    assert proc.returncode != 0 and "database" in proc.stderr and "Traceback" not in proc.stderr

