"""Warm pools: a run's start and throughput with a pooled sandbox, against cold and `docker run`.

"start" is from starting a run to the command's first instruction: the command is
`date +%s%N` in the base image, whose nanosecond clock (containers share the host's)
is read at about its first instruction. "total" is until the run is over (container
removed, report written; for `docker run` until the process ends). Subjects per
runtime, measured interleaved (round-robin, rotating the order) so the load of a
shared machine hits all alike:

- `docker run --rm --network none IMAGE date +%s%N` (the baseline);
- `runner.execute(...)` in a warm Python process: cold (no pool), then pooled (a pool
  of this boundary holding a ready sandbox; the refill between runs is not timed);
- `airlock run --quiet -- date +%s%N` handed to a per-user server whose keeper holds a
  pool learned from the first run (the server's refill between runs is not timed).

Throughput: `--burst` runs of `true` as fast as `--threads` threads can start them,
pooled (a pool of `--threads` sandboxes, refilling as runs claim them) and cold.

    .venv/bin/python benchmarks/bench_pool.py [-n 15] [--runtime runc --runtime runsc]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, ensure_image, machine, median, pct, process_policy, serve, table

COMMAND = ["date", "+%s%N"]
PRESET = {"runc": "default", "runsc": "strict", "runsc-ptrace": "strict"}


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


def timed_api(policy: object, runs_dir: Path, pool: object = None) -> tuple[float, float]:
    from runner import execute

    out: list[bytes] = []
    t0 = time.time_ns()
    result = execute(COMMAND, agent="command", policy=policy, runs_dir=runs_dir,  # type: ignore[arg-type]
                     pool=pool,  # type: ignore[arg-type]
                     on_output=lambda stream, chunk: out.append(chunk) if stream == "stdout"
                     else None)
    t1 = time.time_ns()
    if result.exit_code != 0:
        raise SystemExit(f"API run failed: {result.status} {result.error}")
    return (_stamp(b"".join(out)) - t0) / 1e9, (t1 - t0) / 1e9


def throughput(policy: object, runs_dir: Path, pool: object, burst: int, threads: int
               ) -> float:
    from runner import execute

    def one(_: int) -> int:
        return execute(["true"], agent="command", policy=policy, runs_dir=runs_dir,  # type: ignore[arg-type]
                       pool=pool).exit_code  # type: ignore[arg-type]

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as ex:
        codes = list(ex.map(one, range(burst)))
    elapsed = time.monotonic() - t0
    if any(codes):
        raise SystemExit(f"throughput runs failed: {codes}")
    return burst / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=15, help="runs per subject and runtime")
    ap.add_argument("--runtime", action="append", help="runc, runsc, runsc-ptrace (default: runc and runsc)")
    ap.add_argument("--burst", type=int, default=24, help="runs per throughput measurement")
    ap.add_argument("--threads", type=int, default=4, help="concurrent runs for throughput")
    args = ap.parse_args()

    from runner import Pool, load_policy
    from runner.agents import get_agent
    from runner.engines import get_engine
    from runner.run.orchestrator import with_agent_tmpfs
    from runner.run.pool import Recipe

    image = ensure_image("base")
    runs_dir = Path(tempfile.mkdtemp(prefix="airlock-bench-runs-"))
    base_env = {**os.environ, "AIRLOCK_RUNS_DIR": str(runs_dir), "AIRLOCK_AUTO_SERVE": "0"}
    airlock = [str(Path(sys.executable).parent / "airlock"), "run", "--quiet"]
    print(f"# warm pools: {machine()}")
    print(f"# {args.n} runs per subject and runtime, interleaved; image {image}\n")
    rows, tput = [], []
    engine = get_engine()
    try:
        with serve(base_env) as (served_env, _pid):
            for runtime in args.runtime or ["runc", "runsc"]:
                policy = load_policy(PRESET[runtime])
                policy = policy.model_copy(update={"process": policy.process.model_copy(
                    update=process_policy(runtime))})
                recipe = Recipe(with_agent_tmpfs(policy, get_agent("command")), image)
                cli = [*airlock, "--policy", PRESET[runtime], "--runtime", runtime, "--", *COMMAND]
                bare = ["docker", "run", "--rm", "--network", "none", "--runtime", runtime,
                        image, *COMMAND]
                with Pool(engine, max_total=2) as pool:
                    pool.add(recipe, 2)

                    def pooled(p: Pool = pool, r: Recipe = recipe, pol: object = policy
                               ) -> tuple[float, float]:
                        if not p.wait_ready(r, 1, timeout=120):
                            raise SystemExit("the pool did not refill")
                        return timed_api(pol, runs_dir, p)

                    def served(c: list[str] = cli, rt: str = runtime) -> tuple[float, float]:
                        time.sleep(1.5 if rt != "runc" else 1.0)  # the keeper's refill
                        return timed_process(c, served_env)

                    subjects: list[tuple[str, Callable[[], tuple[float, float]]]] = [
                        ("docker run (baseline)", lambda b=bare: timed_process(b, base_env)),
                        ("Python API, cold", lambda pol=policy: timed_api(pol, runs_dir)),
                        ("Python API, pooled", pooled),
                        ("airlock CLI, server's pool", served),
                    ]
                    for _name, fn in subjects:  # warm caches; the server learns the key
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
                        rows.append((runtime, name, f"{ms * 1000:.0f}",
                                     f"{pct(starts, 90) * 1000:.0f}", f"{ms / base_start:.2f}x",
                                     f"{mt * 1000:.0f}", f"{mt / base_total:.2f}x"))
                with Pool(engine, max_total=args.threads) as pool:
                    pool.add(recipe, args.threads)
                    pool.wait_ready(recipe, args.threads, timeout=300)
                    warm_rate = throughput(policy, runs_dir, pool, args.burst, args.threads)
                cold_rate = throughput(policy, runs_dir, None, args.burst, args.threads)
                tput.append((runtime, args.threads, args.burst, f"{cold_rate:.1f}",
                             f"{warm_rate:.1f}", f"{warm_rate / cold_rate:.2f}x"))
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    print(table(["runtime", "subject", "start p50 ms", "start p90 ms", "start vs docker",
                 "total p50 ms", "total vs docker"], rows))
    print()
    print(table(["runtime", "threads", "runs", "cold runs/s", "pooled runs/s", "pooled vs cold"],
                tput))
    return 0


if __name__ == "__main__":
    sys.exit(main())
