"""Event log throughput: the hash-chained log against plain JSONL writes.

Every variant writes the same events to a file on the same filesystem, one line per
event, each line written to the file before the next event (as the run's log must:
a crash leaves a valid prefix). Baselines measured in the same run, interleaved:

- plain JSONL, one write per line (json.dumps + os.write): the same durability,
  no chain, no event object;
- plain JSONL, buffered (one write per 64 KiB): what a log that may lose its tail
  costs, for scale;
- `EventLog.emit` (the run's log): event object, JSON, SHA-256 of the line chained into
  the next, one write per line, under a lock (services emit from their own threads);
- `EventLog.emit` from 4 threads at once;
- reading back and verifying the chain (`airlock events verify`).

Two payloads: a small lifecycle event and an `agent.output` event with 2 KiB of text.

    .venv/bin/python benchmarks/bench_events.py [--events 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, machine, median, table

from runner.events.log import EventLog
from runner.events.verify import verify_log

PAYLOADS = {
    "small": ("sandbox.started", {"container": "0123456789ab", "runtime": "runc"}),
    "output 2 KiB": ("agent.output", {"stream": "stdout", "text": ("lorem ipsum dolor sit amet "
                                                                    * 80)[:2048],
                                      "truncated": False}),
}


def plain(path: Path, n: int, etype: str, data: dict[str, object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
    try:
        for seq in range(1, n + 1):
            line = json.dumps({"seq": seq, "ts": round(time.time(), 6), "run_id": "bench",
                               "type": etype, "source": "host", "data": data},
                              separators=(",", ":"), ensure_ascii=False).encode()
            os.write(fd, line + b"\n")
    finally:
        os.close(fd)


def buffered(path: Path, n: int, etype: str, data: dict[str, object]) -> None:
    with path.open("wb", buffering=64 * 1024) as fh:
        for seq in range(1, n + 1):
            fh.write(json.dumps({"seq": seq, "ts": round(time.time(), 6), "run_id": "bench",
                                 "type": etype, "source": "host", "data": data},
                                separators=(",", ":"), ensure_ascii=False).encode() + b"\n")


def chained(path: Path, n: int, etype: str, data: dict[str, object]) -> None:
    log = EventLog(path, "bench")
    for _ in range(n):
        log.emit(etype, "host", **data)
    log.close()


def chained_threads(path: Path, n: int, etype: str, data: dict[str, object]) -> None:
    log = EventLog(path, "bench")

    def work(k: int) -> None:
        for _ in range(k):
            log.emit(etype, "host", **data)

    threads = [threading.Thread(target=work, args=(n // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=ROOT / "runs",
                    help="where the logs are written (default: runs/, where runs write)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-events-", dir=args.dir))
    variants: list[tuple[str, Callable[[Path, int, str, dict[str, object]], None]]] = [
        ("plain JSONL, write per line", plain),
        ("plain JSONL, buffered", buffered),
        ("EventLog (hash chain)", chained),
        ("EventLog, 4 threads", chained_threads),
    ]
    n = args.events
    print(f"# event log throughput: {machine()}")
    print(f"# {n} events per round, {args.rounds} rounds (median), files in {args.dir}\n")
    rows = []
    try:
        for pname, (etype, data) in PAYLOADS.items():
            times: dict[str, list[float]] = {name: [] for name, _ in variants}
            times["verify the chain"] = []
            for r in range(args.rounds):
                for name, fn in variants:
                    path = work / f"{r}-{abs(hash((pname, name)))}.jsonl"
                    t0 = time.perf_counter()
                    fn(path, n, etype, data)
                    times[name].append(time.perf_counter() - t0)
                    if fn is chained:
                        t0 = time.perf_counter()
                        problems = verify_log(path, run_id="bench")
                        times["verify the chain"].append(time.perf_counter() - t0)
                        assert not problems, problems
                    path.unlink()
            base = median(times[variants[0][0]])
            for name, values in times.items():
                m = median(values)
                rows.append((pname, name, f"{n / m:,.0f}", f"{m / n * 1e6:.1f}",
                             f"{m / base:.2f}x"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(["payload", "what", "events/s", "us/event", "vs plain per-line"], rows))
    print("\nA run emits tens to a few thousand events; at these rates the log costs "
          "well under a millisecond per hundred events.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
