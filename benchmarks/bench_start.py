"""Start latency: from starting a run to the command's first instruction, against `docker run`.

The command is `date +%s%N` in the base image: the nanosecond clock it prints is read
at (about) its first instruction, and containers share the host's clock, so
"start" = that time minus the moment the run was started. "total" is until the
run is over (container removed, report written). Subjects, each with the same image
and engine, measured interleaved (round-robin, rotating the order) so that the load of
a shared machine hits all alike:

- `docker run --rm --network none IMAGE date +%s%N` (the baseline; `--runtime` as given);
- `airlock run --quiet -- date +%s%N` as it is by default: the first run starts a
  per-user server and goes in-process, later ones are handed to the warm server (the
  first, cold run is printed apart);
- the same with no server at all (AIRLOCK_NO_SERVE=1): every run imports everything;
- `runner.execute([...], agent="command")` from Python, in a warm process.

    .venv/bin/python benchmarks/bench_start.py [-n 15] [--runtime runc --runtime runsc]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, auto_serve, ensure_image, machine, median, pct, process_policy, table, wait_served

COMMAND = ["date", "+%s%N"]


def _stamp(out: bytes) -> int:
    for line in out.decode(errors="replace").split():
        if line.isdigit() and len(line) >= 18:
            return int(line)
    raise ValueError(f"no timestamp in {out[-300:]!r}")


def timed_process(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    t0 = time.time_ns()
    proc = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env)
    t1 = time.time_ns()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... exited {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace')[-800:]}")
    return (_stamp(proc.stdout) - t0) / 1e9, (t1 - t0) / 1e9


def timed_api(runtime: str, runs_dir: Path) -> tuple[float, float]:
    from runner import execute

    out: list[bytes] = []
    policy = {"extends": "default", "process": process_policy(runtime)}
    t0 = time.time_ns()
    result = execute(COMMAND, agent="command", policy=policy, runs_dir=runs_dir,
                     on_output=lambda stream, chunk: out.append(chunk) if stream == "stdout"
                     else None)
    t1 = time.time_ns()
    if result.exit_code != 0:
        raise SystemExit(f"API run failed: {result.status} {result.error}")
    return (_stamp(b"".join(out)) - t0) / 1e9, (t1 - t0) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=15, help="runs per subject and runtime")
    ap.add_argument("--runtime", action="append", help="runc, runsc, runsc-ptrace (default: runc and runsc)")
    ap.add_argument("--no-serve", action="store_true",
                    help="leave out the served CLI (to measure versions without it)")
    args = ap.parse_args()
    image = ensure_image("base")
    runs_dir = Path(tempfile.mkdtemp(prefix="airlock-bench-runs-"))
    base_env = {**os.environ, "AIRLOCK_RUNS_DIR": str(runs_dir), "AIRLOCK_AUTO_SERVE": "0"}
    local_env = {**base_env, "AIRLOCK_NO_SERVE": "1"}
    airlock = [str(Path(sys.executable).parent / "airlock"), "run", "--quiet"]
    print(f"# start latency: {machine()}")
    print(f"# {args.n} runs per subject and runtime, interleaved; image {image}\n")
    rows = []
    try:
        with contextlib.ExitStack() as stack:
            served_env = None if args.no_serve else stack.enter_context(auto_serve(base_env))
            cold: list[str] = []
            for runtime in args.runtime or ["runc", "runsc"]:
                bare = ["docker", "run", "--rm", "--network", "none", "--runtime", runtime,
                        image, *COMMAND]
                cli = [*airlock, "--runtime", runtime, "--", *COMMAND]
                subjects: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                    ("docker run (baseline)", lambda b=bare: timed_process(b, base_env)),
                    ("airlock CLI, no server", lambda c=cli: timed_process(c, local_env)),
                    ("Python API (warm)", lambda r=runtime: timed_api(r, runs_dir)),
                ]
                if served_env is not None:
                    subjects.insert(1, ("airlock CLI (default)",
                                        lambda c=cli, e=served_env: timed_process(c, e)))
                    if not cold:  # the very first run: in-process, and starts the server
                        s, t = timed_process(cli, served_env)
                        cold.append(f"first run, which starts the server: start "
                                    f"{s * 1000:.0f} ms, total {t * 1000:.0f} ms ({runtime})")
                        wait_served(served_env)
                for _name, fn in subjects:  # warm caches (and the API's imports)
                    fn()
                results: dict[str, list[tuple[float, float]]] = {n: [] for n, _ in subjects}
                for i in range(args.n):
                    k = i % len(subjects)
                    for name, fn in subjects[k:] + subjects[:k]:
                        results[name].append(fn())
                base_start = median([s for s, _ in results[subjects[0][0]]])
                base_total = median([t for _, t in results[subjects[0][0]]])
                for name, _ in subjects:
                    starts = [s for s, _ in results[name]]
                    totals = [t for _, t in results[name]]
                    ms, mt = median(starts), median(totals)
                    rows.append((runtime, name, f"{ms * 1000:.0f}", f"{pct(starts, 90) * 1000:.0f}",
                                 f"{ms / base_start:.2f}x", f"{(ms - base_start) * 1000:+.0f}",
                                 f"{mt * 1000:.0f}", f"{mt / base_total:.2f}x",
                                 f"{(mt - base_total) * 1000:+.0f}"))
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    print(table(["runtime", "subject", "start p50 ms", "start p90 ms", "start vs docker",
                 "start added ms", "total p50 ms", "total vs docker", "total added ms"], rows))
    for line in cold:
        print(f"\n(airlock CLI (default): {line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
