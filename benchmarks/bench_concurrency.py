"""Many runs at once: 16 and 32 concurrent runs on this machine, against as many `docker run`.

Every run starts at the same moment and executes

    date +%s%N; until [ -e /workspace/stop ]; do sleep 0.1; done

so that all of them are alive together: once every one has printed its first
instruction's time, the host's memory is sampled and the stop file is created (the
workspace is mounted read-only; the file appears inside through the bind mount).
Per batch: how many completed with exit 0, p50 and p99 start latency (launch to first
instruction), the wall time until the last one ended, and memory per run while all
were alive: the drop in MemAvailable (everything: engine, shims, containers, host
processes), and the proportional set size (PSS) of Airlock's own host processes.

Subjects: `docker run` (the baseline), `airlock run` CLI processes, the same with
`airlock serve`, and the Python API (one process, one thread per run).

    .venv/bin/python benchmarks/bench_concurrency.py [--sizes 16 32] [--runtime runc]

Density (issue 14: 300 idle runs on runc, 200 on runsc), with a slow poll so that an
idle run is idle:

    .venv/bin/python benchmarks/bench_concurrency.py --sizes 300 --subjects docker api --poll 5
    .venv/bin/python benchmarks/bench_concurrency.py --sizes 200 --runtime runsc \
        --subjects docker api --poll 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import ROOT, ensure_image, machine, pct, process_policy, serve, table

POLL = 0.1


def script(poll: float) -> str:
    # The poll forks `sleep`: under gVisor every fork and exec traps, and 200 sandboxes
    # polling ten times a second kept two cores busy (load average ~1,000): density runs
    # poll every few seconds, so that an idle run is idle.
    return f"date +%s%N; until [ -e /workspace/stop ]; do sleep {poll:g}; done"


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def pss_of(pids: set[int], *, descend: bool = True) -> int:
    """Proportional set size of these processes (and all their descendants)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    todo, seen, total = list(pids), set(), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if descend:
            todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def containers_using(path: Path) -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--no-trunc", "--filter", f"volume={path}"],
                         capture_output=True, text=True, timeout=60).stdout
    return out.split()


def container_memory(ids: list[str]) -> int:
    """Memory charged to these containers' cgroups (usage less inactive page cache, as
    `docker stats` counts it, read through the engine's API on cgroup v1 and v2 alike),
    plus the PSS of the engine's shim process for each."""
    import docker

    client = docker.from_env(timeout=120)
    total = 0
    for cid in ids:
        with contextlib.suppress(docker.errors.APIError, KeyError, TypeError):
            mem = client.containers.get(cid).stats(stream=False, one_shot=True)["memory_stats"]
            stat = mem.get("stats") or {}
            total += int(mem["usage"]) - int(stat.get("total_inactive_file",
                                                      stat.get("inactive_file", 0)))
    shims = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "containerd-shim" in text and any(cid in text for cid in ids):
            shims.add(int(cmdline.parent.name))
    return total + pss_of(shims, descend=False)


class Batch:
    """N runs started together; each reports (start latency, exit code) when it ends."""

    def __init__(self, n: int, workdir: Path) -> None:
        self.n = n
        self.work = workdir
        self.stop = workdir / "stop"
        self.results: list[tuple[float | None, int]] = []
        self.started: list[float] = []
        self.lock = threading.Lock()
        self.pids: set[int] = set()

    def note_start(self, t: float) -> None:
        with self.lock:
            self.started.append(t)

    def all_started(self) -> bool:
        with self.lock:
            return len(self.started) >= self.n

    def finish(self, start: float | None, code: int) -> None:
        with self.lock:
            self.results.append((start, code))


def _stamp(text: str) -> int | None:
    for word in text.split():
        if word.isdigit() and len(word) >= 18:
            return int(word)
    return None


def process_subject(cmd: list[str], env: dict[str, str]) -> Callable[[Batch, int], None]:
    def one(batch: Batch, t0: int) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd=ROOT)
        with batch.lock:
            batch.pids.add(proc.pid)
        assert proc.stdout is not None
        first = proc.stdout.readline().decode(errors="replace")
        stamp = _stamp(first)
        if stamp is not None:
            batch.note_start((stamp - t0) / 1e9)
        _out, err = proc.communicate()
        if proc.returncode != 0:
            sys.stderr.write(f"  run failed ({proc.returncode}): {err.decode()[-300:]}\n")
        batch.finish((stamp - t0) / 1e9 if stamp else None, proc.returncode)
    return one


def api_subject(runtime: str, runs_dir: Path, cmd: str) -> Callable[[Batch, int], None]:
    from runner import execute

    def one(batch: Batch, t0: int) -> None:
        seen: list[int] = []

        def on_output(stream: str, chunk: bytes) -> None:
            if stream == "stdout" and not seen:
                stamp = _stamp(chunk.decode(errors="replace"))
                if stamp is not None:
                    seen.append(stamp)
                    batch.note_start((stamp - t0) / 1e9)

        try:
            result = execute(["sh", "-c", cmd], agent="command", workspace=batch.work,
                             policy={"extends": "default", "process": process_policy(runtime)},
                             runs_dir=runs_dir, on_output=on_output)
            code = result.exit_code
            if code:
                sys.stderr.write(f"  run failed: {result.status} {result.error}\n")
        except Exception as exc:  # counted as a failure
            sys.stderr.write(f"  run raised: {exc}\n")
            code = -1
        batch.finish((seen[0] - t0) / 1e9 if seen else None, code)
    return one


def run_batch(n: int, subject: Callable[[Batch, int], None], own_pids: set[int],
              timeout: float, poll: float) -> dict[str, float | int]:
    work = Path(tempfile.mkdtemp(prefix="airlock-bench-conc-"))
    os.chmod(work, 0o755)
    batch = Batch(n, work)
    before = mem_available()
    t0 = time.time_ns()
    threads = [threading.Thread(target=subject, args=(batch, t0), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not batch.all_started() and time.monotonic() < deadline:
        if len(batch.results) >= n:  # everything ended (failed) before starting
            break
        time.sleep(0.05)
    time.sleep(0.5)  # let the last ones settle into their loop
    during = mem_available()
    pss = pss_of(batch.pids | own_pids)
    ids = containers_using(work)
    sandboxes = container_memory(ids)
    batch.stop.touch()
    # gVisor caches the workspace's directory entries (runsc's exclusive file access), so
    # a sandbox that already looked for the stop file may never see it appear: what
    # still runs a few polls later is killed, and counted as stopped, not failed.
    settle = time.monotonic() + 3 * poll + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < settle:
        time.sleep(0.2)
    alive = containers_using(work)
    if alive:
        subprocess.run(["docker", "kill", *alive], capture_output=True, timeout=300)
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    wall = (time.time_ns() - t0) / 1e9
    shutil.rmtree(work, ignore_errors=True)
    starts = [s for s, _ in batch.results if s is not None]
    ok = sum(1 for _, c in batch.results if c == 0)
    ok += min(len(alive), sum(1 for _, c in batch.results if c != 0))
    return {"ok": ok, "n": n, "p50": pct(starts, 50) if starts else float("nan"),
            "p99": pct(starts, 99) if starts else float("nan"), "wall": wall,
            "mem": (before - during) / n, "pss": pss / n, "box": sandboxes / max(1, len(ids)),
            "alive": len(ids)}


SUBJECTS = {"docker": "docker run (baseline)", "cli": "airlock CLI",
            "serve": "airlock CLI + serve", "api": "Python API (threads)"}


def raise_descriptor_limit() -> None:
    """Hundreds of runs in one process need more than the usual 1,024 descriptors (each
    run holds its gateway's, MCP's, control's and log's, and the engine connections)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 65536:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--runtime", default="runc")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--poll", type=float, default=POLL,
                    help="seconds between a run's looks for the stop file (density: 5)")
    ap.add_argument("--subjects", nargs="+", choices=list(SUBJECTS), default=list(SUBJECTS),
                    help="which starters to measure (density: `--sizes 300 --subjects api`)")
    args = ap.parse_args()
    raise_descriptor_limit()
    image = ensure_image("base")
    runs_dir = Path(tempfile.mkdtemp(prefix="airlock-bench-runs-"))
    base_env = {**os.environ, "AIRLOCK_RUNS_DIR": str(runs_dir)}
    local_env = {**base_env, "AIRLOCK_NO_SERVE": "1"}
    print(f"# concurrent runs: {machine()}")
    print(f"# runtime {args.runtime}, image {image}; memory per run while all were alive\n")
    rows = []
    try:
        with serve(base_env) as (served_env, server_pid):
            for n in args.sizes:
                for kind in args.subjects:
                    name = SUBJECTS[kind]
                    fn = _subject(kind, image, args.runtime, runs_dir, local_env, served_env,
                                  script(args.poll))
                    own = {server_pid} if kind == "serve" else {os.getpid()} if kind == "api" \
                        else set()
                    r = run_batch(n, fn, own, args.timeout, args.poll)
                    rows.append((n, name, f"{r['ok']}/{r['n']}", f"{r['p50'] * 1000:.0f}",
                                 f"{r['p99'] * 1000:.0f}", f"{r['wall']:.1f}",
                                 f"{r['box'] / 2**20:.1f}", f"{r['pss'] / 2**20:.1f}",
                                 f"{(r['box'] + r['pss']) / 2**20:.1f}",
                                 f"{r['mem'] / 2**20:.0f}"))
                    time.sleep(2)  # let the engine settle between batches
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    print(table(["runs", "subject", "completed", "start p50 ms", "start p99 ms", "wall s",
                 "sandbox MiB", "host procs MiB", "MiB per run", "MemAvailable drop MiB"], rows))
    print("\nPer run, while all were alive. sandbox: the container's cgroup (usage less inactive"
          "\npage cache) plus its containerd shim's PSS. host procs: PSS of the processes that"
          "\nstarted the runs (docker CLI; airlock CLI; thin clients + server and workers; the"
          "\nPython process). MemAvailable drop: the whole machine's (noisy when shared).")
    return 0


def _subject(kind: str, image: str, runtime: str, runs_dir: Path, local_env: dict[str, str],
             served_env: dict[str, str], cmd: str) -> Callable[[Batch, int], None]:
    if kind == "api":
        return api_subject(runtime, runs_dir, cmd)

    def make(batch_dir_cmd: Callable[[Path], list[str]], env: dict[str, str]
             ) -> Callable[[Batch, int], None]:
        def one(batch: Batch, t0: int) -> None:
            process_subject(batch_dir_cmd(batch.work), env)(batch, t0)
        return one

    if kind == "docker":
        return make(lambda w: ["docker", "run", "--rm", "--network", "none", "--runtime",
                               runtime, "-v", f"{w}:/workspace:ro", image, "sh", "-c", cmd],
                    local_env)
    cli = [sys.executable, "-m", "runner.cli", "run", "--quiet", "--runtime", runtime]
    return make(lambda w: [*cli, "--workspace", str(w), "--", "sh", "-c", cmd],
                local_env if kind == "cli" else served_env)


if __name__ == "__main__":
    sys.exit(main())
