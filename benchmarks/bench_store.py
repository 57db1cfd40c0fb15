"""The service's store: what each call costs on SQLite and on a real PostgreSQL server,
with the queue as the issue sizes it (8 runs running, 200 queued, 3 tenants), and the
shares a full host gives tenants weighted 1/1/2.

- `create_run` (quota checks and insert, one transaction), `get_run`, `list_runs`;
- `claim_next` + `finish` (one slot freed and refilled, in weighted fair order);
- shares: a host of 8 slots kept full, runs of random length, slot-time per tenant.

PostgreSQL is Debian's, started on a private socket in a temporary directory (as the
tests do), with fsync off: the numbers are the store's queries, not the disk's.

    .venv/bin/python benchmarks/bench_store.py [-n 300]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from _common import machine, pct, table

from runner.service.store import Quota, Store, open_store
from runner.testing.postgres import PostgresServer

CMD = {"agent": "command", "command": ["true"]}
WEIGHTS = {"a": 1, "b": 1, "c": 2}


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def measure(store: Store, n: int) -> list[list[object]]:
    quota = Quota(queued=100_000, runs_per_day=1_000_000, tokens_per_day=10**12)
    for i in range(200):
        store.create_run("abc"[i % 3], CMD, quota=quota)
    running = [store.claim_next("h", WEIGHTS, {}) for _ in range(8)]
    some = running[0]
    assert some is not None
    rows = []
    rows.append(["create_run (quotas + insert)",
                 *_p(timed(lambda: store.create_run("a", CMD, quota=quota), n))])
    rows.append(["get_run", *_p(timed(lambda: store.get_run(some.id, "a"), n))])
    rows.append(["list_runs (50)", *_p(timed(lambda: store.list_runs("a", 50), n))])

    rng = random.Random(1)

    def cycle() -> None:
        done = running.pop(rng.randrange(len(running)))
        store.finish(done.id, "succeeded", 0, "command", {"tokens": 100})
        nxt = store.claim_next("h", WEIGHTS, {})
        assert nxt is not None
        running.append(nxt)

    rows.append(["finish + claim_next", *_p(timed(cycle, n))])
    return rows


def shares(store: Store, steps: int) -> dict[str, float]:
    for t in WEIGHTS:
        for _ in range(steps):
            store.create_run(t, CMD, quota=Quota())
    rng = random.Random(7)
    running = [store.claim_next("fair", WEIGHTS, {}) for _ in range(8)]
    slot_time: Counter[str] = Counter()
    for _ in range(steps):
        for r in running:
            assert r is not None
            slot_time[r.tenant] += 1
        done = running.pop(rng.randrange(len(running)))
        assert done is not None
        store.finish(done.id, "succeeded", 0, "command")
        running.append(store.claim_next("fair", WEIGHTS, {}))
    total = sum(slot_time.values())
    return {t: slot_time[t] / total for t in WEIGHTS}


def _p(ms: list[float]) -> list[str]:
    return [f"{pct(ms, 50):.2f}", f"{pct(ms, 99):.2f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=300, help="calls measured per row")
    args = ap.parse_args()
    print(machine())
    rows: list[list[object]] = []
    share_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as pg:
        for name, fresh in (("sqlite", lambda n: f"sqlite:///{Path(tmp) / n}.db"),
                            ("postgresql", lambda n: pg.create_database())):
            with open_store(fresh("calls")) as store:
                rows += [[name, *r] for r in measure(store, args.n)]
            with open_store(fresh("shares")) as store:  # no runs of the first part
                got = shares(store, 400)
            share_rows.append([name, *(f"{got[t]:.3f} (want {w / 4:.3f})"
                                       for t, w in WEIGHTS.items())])
    print("\nStore calls with 8 running and 200+ queued (ms):\n")
    print(table(["database", "call", "p50", "p99"], rows))
    print("\nSlot-time shares of a full host (8 slots, runs of random length, 400 ends):\n")
    print(table(["database", "a (weight 1)", "b (weight 1)", "c (weight 2)"], share_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
