"""The service's store on a real SQLite file and a real PostgreSQL server: migrations,
quotas under concurrency, weighted fair claims, claims from several processes, leases."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select

from runner.service.store import Quota, QuotaExceeded, StoreError, open_store
from runner.service.store import schema as S
from runner.service.store.migrations import LATEST

CMD = {"agent": "command", "command": ["true"]}


@pytest.fixture
def store(database_url: str):
    s = open_store(database_url)
    yield s
    s.close()


def test_migrations_run_once_from_many_processes_at_once(database_url: str) -> None:
    code = ("import sys; from runner.service.store import open_store; "
            "s = open_store(sys.argv[1]); s.close(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    with open_store(database_url) as s, s.engine.connect() as c:
        versions = list(c.execute(select(S.schema_version.c.version)).scalars())
        assert versions == list(range(1, LATEST + 1))
        # What the migrations built is what the queries expect.
        insp = inspect(c)
        for table in S.metadata.sorted_tables:
            cols = {col["name"] for col in insp.get_columns(table.name)}
            assert cols == {col.name for col in table.columns}, table.name


def test_a_database_newer_than_the_code_is_refused(database_url: str) -> None:
    with open_store(database_url) as s, s.engine.begin() as c:
        c.execute(S.schema_version.insert().values(version=LATEST + 1, description="future",
                                                   applied_at=0.0))
    with pytest.raises(StoreError, match="newer than this Airlock"):
        open_store(database_url)


def test_bad_urls_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(StoreError, match="not supported"):
        open_store("mysql://x@localhost/db")
    with pytest.raises(StoreError, match="not a database URL"):
        open_store("::nonsense")
    with pytest.raises(StoreError, match="database postgresql"):
        open_store(f"postgresql://nobody@/nodb?host={tmp_path}&port=1")


def test_records_belong_to_their_tenant_and_page_newest_first(store) -> None:
    ids = [store.create_run("acme", {**CMD, "n": i}, quota=Quota()).id for i in range(5)]
    other = store.create_run("globex", CMD, quota=Quota())
    rec = store.get_run(ids[0], "acme")
    assert rec is not None and rec.status == "queued" and rec.request["n"] == 0
    assert store.get_run(ids[0], "globex") is None
    assert store.get_run(other.id, "acme") is None
    page, cursor = store.list_runs("acme", limit=2)
    assert [r.id for r in page] == ids[::-1][:2] and cursor == ids[3]
    page2, cursor2 = store.list_runs("acme", limit=10, cursor=cursor)
    assert [r.id for r in page2] == ids[::-1][2:] and cursor2 is None
    assert store.list_runs("globex", cursor=ids[0]) == ([], None)


def test_a_listing_never_loads_whole_requests(store) -> None:
    """A request is up to 1 MiB; a page of 1,000 whole ones cost the service ~1.2 GB
    (measured: 6 lists of 95 such runs at once took it from 105 to 834 MB)."""
    big = {"agent": "command", "command": ["true", *["x" * 60_000] * 16], "policy": {}}
    made = [store.create_run("acme", big, quota=Quota()).id for _ in range(3)]
    store.create_run("acme", {"agent": "builtin", "task": "t" * 100_000}, quota=Quota())
    page, _ = store.list_runs("acme", limit=10)
    assert [r.request for r in page] == [{"agent": "builtin"}] + [{"agent": "command"}] * 3
    assert store.get_run(made[0], "acme").request == big  # one run: the whole request


def test_queued_quota_is_atomic_under_concurrency(database_url: str) -> None:
    stores = [open_store(database_url) for _ in range(4)]
    made, refused = [], []
    barrier = threading.Barrier(16)

    def submit(i: int) -> None:
        barrier.wait()
        try:
            made.append(stores[i % 4].create_run("acme", CMD, quota=Quota(queued=5)).id)
        except QuotaExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(made) == 5 and len(refused) == 11
        assert {e.which for e in refused} == {"queued"} and all(e.retry_after_s > 0 for e in refused)
        assert stores[0].counts()["acme"] == {"queued": 5, "running": 0}
        # Another tenant's queue is its own.
        stores[0].create_run("globex", CMD, quota=Quota(queued=5))
    finally:
        for s in stores:
            s.close()


def test_daily_quotas_count_runs_and_gateway_tokens(store) -> None:
    for _ in range(3):
        store.create_run("acme", CMD, quota=Quota(runs_per_day=3))
    with pytest.raises(QuotaExceeded) as exc:
        store.create_run("acme", CMD, quota=Quota(runs_per_day=3))
    now = datetime.now(UTC)
    to_midnight = 86400 - (now.hour * 3600 + now.minute * 60 + now.second)
    assert exc.value.which == "runs_per_day" and abs(exc.value.retry_after_s - to_midnight) <= 3
    # Ended runs still count for the day; finished or not, the quota is per day.
    run = store.create_run("tok", CMD, quota=Quota(tokens_per_day=1000))
    store.add_usage("tok", run.id, {"tokens": 600, "requests": 2})
    store.create_run("tok", CMD, quota=Quota(tokens_per_day=1000))
    store.add_usage("tok", run.id, {"tokens": 400})
    with pytest.raises(QuotaExceeded, match="tokens_per_day"):
        store.create_run("tok", CMD, quota=Quota(tokens_per_day=1000))
    assert store.get_run(run.id).usage == {"tokens": 1000, "requests": 2}
    # The final total given at the end counts once, not on top of what was added.
    store.claim_next("h", {}, {})
    store.finish(run.id, "succeeded", 0, "command",
                 {"tokens": 1200, "requests": 2, "peak_memory_bytes": 5e6})
    today = now.date()
    assert store.usage("tok", since=today) == {"tokens": 1200, "requests": 2,
                                               "peak_memory_bytes": 5e6}
    assert list(store.usage_by_day("tok")) == [today.isoformat()]


def _drain(store, host: str, weights, concurrent=None):
    out = []
    while (rec := store.claim_next(host, weights, concurrent or {})) is not None:
        out.append(rec)
    return out


def test_a_backlog_delays_another_tenant_by_one_slot_at_most(store) -> None:
    hog = [store.create_run("hog", {**CMD, "n": i}, quota=Quota()).id for i in range(100)]
    first = [store.claim_next("h", {"hog": 1, "new": 1}, {}) for _ in range(4)]
    assert [r.id for r in first] == hog[:4]  # FIFO within a tenant
    late = store.create_run("new", CMD, quota=Quota())
    # The next free slot goes to the newcomer, not to the rest of the backlog.
    assert store.claim_next("h", {"hog": 1, "new": 1}, {}).id == late.id
    assert store.claim_next("h", {"hog": 1, "new": 1}, {}).id == hog[4]


def test_weighted_shares_of_a_full_host_follow_the_weights(store) -> None:
    weights = {"a": 1, "b": 1, "c": 2}
    for t in weights:
        for _ in range(120):
            store.create_run(t, CMD, quota=Quota())
    capacity, rng = 8, random.Random(7)
    running = [store.claim_next("h", weights, {}) for _ in range(capacity)]
    slot_time: Counter[str] = Counter()
    for _step in range(200):
        # Runs of unequal length: each step ends one run at random and refills the slot.
        for r in running:
            slot_time[r.tenant] += 1
        done = running.pop(rng.randrange(len(running)))
        store.finish(done.id, "succeeded", 0, "command")
        running.append(store.claim_next("h", weights, {}))
    total = sum(slot_time.values())
    for t, w in weights.items():
        share, want = slot_time[t] / total, w / sum(weights.values())
        assert abs(share - want) <= 0.1 * want, (t, share, want)


def test_concurrent_limit_holds_a_tenant_back_not_the_others(store) -> None:
    for _ in range(4):
        store.create_run("a", CMD, quota=Quota())
    store.create_run("b", CMD, quota=Quota())
    got = _drain(store, "h", {}, {"a": 2})
    assert Counter(r.tenant for r in got) == {"a": 2, "b": 1}
    store.finish(got[0].id if got[0].tenant == "a" else got[1].id, "failed", 1, "command")
    assert store.claim_next("h", {}, {"a": 2}).tenant == "a"
    assert store.claim_next("h", {}, {"a": 2}) is None


CLAIMER = """
import json, sys, time
from runner.service.store import open_store
s = open_store(sys.argv[1])
host = sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()
got = []
while (r := s.claim_next(host, {}, {})) is not None:
    got.append(r.id)
    time.sleep(0.01)  # a host starts the run it took before it takes another
print(json.dumps(got))
"""


def test_two_processes_never_claim_the_same_run(store, database_url: str) -> None:
    ids = {store.create_run(f"t{i % 3}", CMD, quota=Quota()).id for i in range(60)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, database_url, host],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for host in ("host-a", "host-b")]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    a, b = (json.loads(out) for out, _ in results)
    assert not set(a) & set(b) and set(a) | set(b) == ids and len(a) + len(b) == 60
    assert a and b, "both hosts should have taken runs"
    assert {r.host_id for r in store.runs_of_host("host-a", ["running"])} == {"host-a"}
    assert {r.id for r in store.runs_of_host("host-a", ["running"])} == set(a)


def test_a_dead_hosts_runs_become_lost_and_its_return_is_told(store) -> None:
    store.heartbeat("dead", ttl=0.5, address="127.0.0.1:1")
    store.heartbeat("live", ttl=60)
    runs = [store.create_run("acme", CMD, quota=Quota()) for _ in range(3)]
    mine = store.claim_next("dead", {}, {})
    assert store.mark_started(mine.id, "dead", run_dir="/x", container="c1")
    assert not store.mark_started(mine.id, "live")  # not its run
    assert store.expire_dead_hosts() == []
    time.sleep(0.7)
    assert store.expire_dead_hosts() == [mine.id]
    assert store.expire_dead_hosts() == []
    lost = store.get_run(mine.id)
    assert lost.status == "lost" and lost.exit_reason == "host_lost" and lost.ended_at
    assert {h.host_id: h.alive for h in store.hosts()} == {"dead": False, "live": True}
    # Queued runs stay queued for the hosts that are alive.
    assert store.claim_next("live", {}, {}).id == runs[1].id
    # The dead host comes back: it learns its lease had run out.
    assert store.heartbeat("dead", ttl=60) is False
    assert store.heartbeat("dead", ttl=60) is True
    assert not store.mark_started(mine.id, "dead")
    # If the run did end after all, its real end replaces `lost`; other ends are final.
    assert store.finish(mine.id, "succeeded", 0, "command").status == "succeeded"
    assert store.finish(mine.id, "failed", 1, "command").status == "succeeded"
    store.leave("live")
    assert not {h.host_id: h.alive for h in store.hosts()}["live"]


def test_cancel_ends_a_queued_run_and_flags_a_running_one(store) -> None:
    a = store.create_run("acme", CMD, quota=Quota())
    b = store.create_run("acme", CMD, quota=Quota())
    assert store.claim_next("h", {}, {}).id == a.id
    assert store.request_cancel(a.id, "globex") is None
    running = store.request_cancel(a.id, "acme")
    assert running.status == "running" and running.cancel_requested and store.cancel_requested(a.id)
    queued = store.request_cancel(b.id, "acme")
    assert queued.status == "cancelled" and queued.ended_at
    assert store.claim_next("h", {}, {}) is None
    assert store.finish(a.id, "cancelled", 130, "cancelled").status == "cancelled"
    assert store.request_cancel(a.id, "acme").status == "cancelled"
    with pytest.raises(StoreError):
        store.finish(a.id, "running", None, None)


def test_an_existing_sqlite_file_keeps_its_records(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b.db'}"
    with open_store(url) as s:
        rid = s.create_run("acme", CMD, quota=Quota()).id
    with open_store(url) as s:
        assert s.get_run(rid).status == "queued"
    # Every tenant's requests are in it: the service's user alone may read it.
    db = tmp_path / "a" / "b.db"
    assert {oct(p.stat().st_mode & 0o777) for p in db.parent.iterdir()} == {"0o600"}
    assert oct(db.parent.stat().st_mode & 0o777) == "0o700"
    # The config's form, sqlite:///var/..., is an absolute path (as in a file: URL).
    with open_store(f"sqlite://{tmp_path / 'a' / 'b.db'}") as s:
        assert s.get_run(rid) is not None
    with open_store(f"sqlite:///./rel-{rid}.db") as s:
        assert Path(s.engine.url.database).resolve() == Path.cwd() / f"rel-{rid}.db"
    for p in Path.cwd().glob(f"rel-{rid}.db*"):
        p.unlink()
    raw = create_engine(url)
    with raw.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    raw.dispose()


def test_postgresql_without_its_driver_says_what_to_install() -> None:
    code = ("import sys; sys.modules['psycopg'] = None\n"
            "from runner.service.store import StoreError, open_store\n"
            "try:\n    open_store('postgresql://u@/db')\n"
            "except StoreError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "airlock[postgres]" in out.stdout and "psycopg" in out.stdout, out.stderr


def test_a_killed_sessions_postgresql_is_stopped_by_the_next() -> None:
    from runner.testing.postgres import _postmaster, collect_stale

    code = ("from runner.testing.postgres import PostgresServer\n"
            "s = PostgresServer().start(); print(s.root, flush=True)\n"
            "import time; time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        root = Path(proc.stdout.readline().strip())
        pid = _postmaster(root)
        assert pid is not None
        assert root not in collect_stale()  # its session is alive: left alone
    finally:
        proc.kill()
        proc.wait(30)
    assert _postmaster(root) == pid  # a killed session leaves its server running...
    assert root in collect_stale()  # ...until the next session looks
    assert not root.exists() and _postmaster(root) is None
