"""`make bench`: every benchmark, one after the other, each printing its own table.

Each benchmark measures its baseline in the same run. The output is Markdown, ready
to paste into docs/performance.md; `--quick` runs fewer repetitions (for a smoke test).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only start gateway ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {
    "start": ("bench_start.py", [], ["-n", "5"]),
    "gateway": ("bench_gateway.py", [], ["--requests", "100", "--stream-mb", "2"]),
    "concurrency": ("bench_concurrency.py", [], ["--sizes", "4"]),
    "idle": ("bench_idle.py", [], ["-n", "3", "--window", "10"]),
    "events": ("bench_events.py", [], ["--events", "5000", "--rounds", "3"]),
    "pool": ("bench_pool.py", [], ["-n", "5", "--burst", "8"]),
    "store": ("bench_store.py", [], ["-n", "50"]),
    "service": ("bench_service.py", [], ["-n", "3", "--requests", "200", "--starts", "24"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these")
    args = ap.parse_args()
    failed = []
    for name, (script, full, quick) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        print(f"\n## {name}\n", flush=True)
        t0 = time.monotonic()
        code = subprocess.call([sys.executable, str(HERE / script),
                                *(quick if args.quick else full)], cwd=HERE.parent)
        print(f"\n({name}: {time.monotonic() - t0:.0f} s)", flush=True)
        if code:
            failed.append(name)
        time.sleep(5)  # let the engine and the machine settle before the next one
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
