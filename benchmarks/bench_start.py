"""Start overhead: `airlock run --agent command -- true` against bare `docker run`.

Both use the same image and engine; the baseline is measured in the same run. Prints a
table of medians (and p90) over N runs each, per runtime, and the ratio.

    .venv/bin/python benchmarks/bench_start.py [-n 10] [--runtime runc --runtime runsc]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.images.build import image_tag  # noqa: E402


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def api_run(runtime: str) -> float:
    from runner import execute

    policy = {"extends": "default", "process": {"runtime": runtime}}
    t0 = time.perf_counter()
    result = execute(["true"], agent="command", policy=policy)
    elapsed = time.perf_counter() - t0
    if result.exit_code != 0:
        raise SystemExit(f"API run failed: {result.error}")
    return elapsed


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--runtime", action="append")
    args = ap.parse_args()
    image = image_tag("base")
    airlock = [sys.executable, "-m", "runner.cli"]
    rows = []
    for runtime in args.runtime or ["runc", "runsc"]:
        bare_cmd = ["docker", "run", "--rm", "--network", "none", "--runtime", runtime, image, "true"]
        cli_cmd = [*airlock, "run", "--quiet", "--runtime", runtime, "--", "true"]
        timed(bare_cmd), timed(cli_cmd)  # warm caches
        bare, cli, api = [], [], []
        for _ in range(args.n):  # interleaved, so drift hits both alike
            bare.append(timed(bare_cmd))
            cli.append(timed(cli_cmd))
            api.append(api_run(runtime))
        base = statistics.median(bare)
        for name, values in (("docker run (baseline)", bare), ("airlock CLI", cli),
                             ("airlock Python API", api)):
            med = statistics.median(values)
            rows.append((runtime, name, med, pct(values, 0.9), med / base, med - base))
    print(f"{'runtime':8} {'what':24} {'median s':>9} {'p90 s':>7} {'ratio':>6} {'added ms':>9}")
    for runtime, name, med, p90, ratio, added in rows:
        print(f"{runtime:8} {name:24} {med:9.3f} {p90:7.3f} {ratio:6.2f} {added * 1000:9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
