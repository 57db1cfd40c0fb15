"""What an idle sandbox costs the host's CPU, per runtime, against `docker run`.

Density is bounded by what idle runs cost, and under gVisor that is not nothing: its
Sentry keeps a sandbox's own timers and platform threads running while the command
sleeps. N sandboxes per subject are started, each running `sleep`; once all are up
and have settled, each one's CPU time is read twice through the engine's API
(`/containers/{id}/stats`, the container's cgroup: the Sentry included under runsc)
`--window` seconds apart. Subjects per runtime:

- `docker run -d --network none --runtime R IMAGE sleep` (the baseline);
- an Airlock run (`Run.execute` in this process, command agent, default policy with
  that runtime): the shim as PID 1 and the command under it.

    .venv/bin/python benchmarks/bench_idle.py [-n 10] [--window 20] \
        [--runtime runc --runtime runsc --runtime runsc-ptrace]

"cores for 200" is 200 times the median: what 200 such idle runs would hold busy.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from _common import ensure_image, machine, median, process_policy, table

SLEEP = 600


def _cpu_ns(container: Any) -> int:
    stats = container.stats(stream=False, one_shot=True)
    return int(stats["cpu_stats"]["cpu_usage"]["total_usage"])


@contextlib.contextmanager
def docker_sandboxes(client: Any, image: str, runtime: str, n: int) -> Iterator[list[Any]]:
    label = f"airlock-bench-idle={time.time_ns()}"
    ids = []
    try:
        for _ in range(n):
            out = subprocess.run(["docker", "run", "-d", "--rm", "--network", "none",
                                  "--label", label, "--runtime", runtime, image,
                                  "sleep", str(SLEEP)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"docker run failed: {out.stderr[-500:]}")
            ids.append(out.stdout.strip())
        yield [client.containers.get(i) for i in ids]
    finally:
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@contextlib.contextmanager
def airlock_sandboxes(client: Any, runtime: str, n: int) -> Iterator[list[Any]]:
    from runner.agents import get_agent
    from runner.engines.base import LABEL_RUN
    from runner.policy.loader import policy_from_dict
    from runner.run.orchestrator import Run, RunOptions

    runs_dir = Path(tempfile.mkdtemp(prefix="airlock-bench-idle-"))
    policy = policy_from_dict({"extends": "default", "process": process_policy(runtime),
                               "resources": {"wall_time": SLEEP + 60}})
    runs = [Run(RunOptions(policy=policy, agent=get_agent("command"),
                           task=["sleep", str(SLEEP)], runs_dir=runs_dir)) for _ in range(n)]
    threads = [threading.Thread(target=r.execute, daemon=True) for r in runs]
    try:
        for t in threads:
            t.start()
        found: list[Any] = []
        deadline = time.monotonic() + 60 + 5 * n
        for run in runs:
            while time.monotonic() < deadline:
                got = client.containers.list(filters={"label": f"{LABEL_RUN}={run.run_id}"})
                if got:
                    found.append(got[0])
                    break
                time.sleep(0.2)
        if len(found) < n:
            raise SystemExit(f"only {len(found)} of {n} Airlock sandboxes started")
        yield found
    finally:
        for run in runs:
            run.cancel()
        for t in threads:
            t.join(120)
        shutil.rmtree(runs_dir, ignore_errors=True)


def measure(start: Callable[[], contextlib.AbstractContextManager[list[Any]]],
            window: float, settle: float) -> list[float]:
    """Each sandbox's CPU over the window, as a percentage of one core."""
    with start() as containers:
        time.sleep(settle)
        before = [(_cpu_ns(c), time.monotonic()) for c in containers]
        time.sleep(window)
        after = [(_cpu_ns(c), time.monotonic()) for c in containers]
    return [100 * (a - b) / 1e9 / (ta - tb) for (b, tb), (a, ta) in zip(before, after, strict=True)]


def main() -> int:
    import docker

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10, help="idle sandboxes per subject")
    ap.add_argument("--window", type=float, default=20.0, help="seconds of CPU read")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds after all started")
    ap.add_argument("--runtime", action="append",
                    help="runc, runsc, runsc-ptrace (default: all the engine has)")
    args = ap.parse_args()
    client = docker.from_env(timeout=120)
    have = set((client.info().get("Runtimes") or {}).keys())
    runtimes = args.runtime or [r for r in ("runc", "runsc", "runsc-ptrace") if r in have]
    missing = [r for r in runtimes if r not in have]
    if missing:
        raise SystemExit(f"the engine has no runtime {', '.join(missing)} (see `make engine`)")
    image = ensure_image("base")
    print(f"# {machine()}")
    print(f"# {args.n} idle sandboxes per subject, `sleep`, CPU read over {args.window:.0f} s "
          f"through the engine's stats; image {image}\n")
    rows = []
    for runtime in runtimes:
        subjects = [("docker run (baseline)", partial(docker_sandboxes, client, image, runtime, args.n)),
                    ("airlock run (API)", partial(airlock_sandboxes, client, runtime, args.n))]
        base = None
        for name, start in subjects:
            cpu = measure(start, args.window, args.settle)
            mid = median(cpu)
            base = mid if base is None else base
            rows.append((runtime, name, f"{args.n}", f"{mid:.2f}", f"{max(cpu):.2f}",
                         f"{mid - base:+.2f}", f"{2 * mid:.1f}"))
            print(f"  {runtime:13} {name:22} median {mid:.2f} % of a core", file=sys.stderr)
    print(table(["runtime", "subject", "sandboxes", "idle CPU % of a core (median)", "max",
                 "vs docker run", "cores for 200"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
