"""The multi-tenant service (`airlock serve --config`), end to end on this machine.

- start: from `POST /v1/runs` to the command's first instruction (`date +%s%N` in the
  base image, read from the run's events), against `runner.execute` of the same command
  in this process (the Python API), interleaved in the same run;
- status: `GET /v1/runs/{id}` latency while 8 runs are running and 200 are queued;
- share: 3 tenants with weights 1/1/2, each with a backlog, on a full host: the share of
  the runs each one started, against its weight's.

    .venv/bin/python benchmarks/bench_service.py [-n 10] [--only start status share]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ensure_image, machine, median, pct, table

from runner.testing.service import ServiceProcess

COMMAND = ["date", "+%s%N"]


def _stamp(text: str) -> int:
    for word in text.split():
        if word.isdigit() and len(word) >= 18:
            return int(word)
    raise ValueError(f"no timestamp in {text[-200:]!r}")


def bench_start(n: int) -> None:
    from runner import execute

    root = Path(tempfile.mkdtemp(prefix="airlock-bench-service-"))
    api_runs = root / "api-runs"
    service_s: list[float] = []
    api_s: list[float] = []
    with ServiceProcess(root, capacity=2, tenants={"t": {"floor": "default"}}) as svc, \
            svc.client("t") as c:
        for i in range(n + 1):
            t0 = time.time_ns()
            run_id = c.post("/v1/runs", json={"command": COMMAND}).json()["id"]
            text = ""
            with c.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "jsonl"}) as r:
                for line in r.iter_lines():
                    e = json.loads(line)
                    if e["type"] == "agent.output" and e["data"].get("stream") == "stdout":
                        text += e["data"].get("text", "")
            took_service = (_stamp(text) - t0) / 1e9
            out: list[bytes] = []

            def collect(stream: str, chunk: bytes, out: list[bytes] = out) -> None:
                if stream == "stdout":
                    out.append(chunk)

            t0 = time.time_ns()
            result = execute(COMMAND, agent="command", policy="default", runs_dir=api_runs,
                             on_output=collect)
            assert result.exit_code == 0, result.error
            took_api = (_stamp(b"".join(out).decode()) - t0) / 1e9
            if i:  # the first of each is a warm-up (imports, first connections)
                service_s.append(took_service)
                api_s.append(took_api)
    rows = [[name, f"{median(v) * 1000:.0f}", f"{pct(v, 90) * 1000:.0f}", len(v)]
            for name, v in (("POST /v1/runs (service)", service_s), ("runner.execute (API)", api_s))]
    print(table(["submit -> first instruction", "p50 ms", "p90 ms", "n"], rows))
    deltas = [s - a for s, a in zip(service_s, api_s, strict=True)]
    print(f"\nservice - API at p50: {(median(service_s) - median(api_s)) * 1000:+.0f} ms "
          f"(paired median {median(deltas) * 1000:+.0f} ms; target: within +30 ms)\n")


def bench_status(requests: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="airlock-bench-service-"))
    with ServiceProcess(root, capacity=8, tenants={
            "t": {"floor": "default", "quota": {"queued": 300}}}) as svc, svc.client("t") as c:
        running = [c.post("/v1/runs", json={"command": ["sleep", "600"]}).json()["id"]
                   for _ in range(8)]
        queued = [c.post("/v1/runs", json={"command": ["true"]}).json()["id"]
                  for _ in range(200)]
        for run_id in running:
            svc.wait(c, run_id, until={"running"}, timeout=180)
        counts = c.get("/v1/usage").json()["active"]
        lat: list[float] = []
        ids = running + queued
        for i in range(requests):
            t0 = time.perf_counter()
            r = c.get(f"/v1/runs/{ids[i % len(ids)]}")
            lat.append(time.perf_counter() - t0)
            assert r.status_code == 200
        for run_id in queued + running:
            c.post(f"/v1/runs/{run_id}/cancel")
    print(table(["GET /v1/runs/{id}", "p50 ms", "p99 ms", "max ms", "n"],
                [[f"{counts['running']} running, {counts['queued']} queued",
                  f"{median(lat) * 1000:.1f}", f"{pct(lat, 99) * 1000:.1f}",
                  f"{max(lat) * 1000:.1f}", len(lat)]]))
    print("\ntarget: p99 under 50 ms\n")


def bench_share(starts: int, capacity: int) -> None:
    weights = {"one": 1, "two": 1, "heavy": 2}
    root = Path(tempfile.mkdtemp(prefix="airlock-bench-service-"))
    backlog = starts  # each tenant alone could fill the whole window
    with ServiceProcess(root, capacity=capacity, tenants={
            t: {"floor": "default", "weight": w, "quota": {"queued": backlog + 10}}
            for t, w in weights.items()}) as svc:
        clients = {t: svc.client(t) for t in weights}
        ids: dict[str, list[str]] = {t: [] for t in weights}
        for _ in range(backlog):  # interleaved, so no tenant's backlog is older
            for t, c in clients.items():
                ids[t].append(c.post("/v1/runs", json={"command": ["sleep", "2"]}).json()["id"])
        started: list[tuple[float, str]] = []
        deadline = time.monotonic() + 20 * starts
        while time.monotonic() < deadline:
            started = []
            for t, c in clients.items():
                for run in c.get("/v1/runs", params={"limit": 1000}).json()["runs"]:
                    if run["started_at"]:
                        started.append((run["started_at"], t))
            if len(started) >= starts:
                break
            time.sleep(1)
        for t, c in clients.items():
            for run_id in ids[t]:
                c.post(f"/v1/runs/{run_id}/cancel")
            c.close()
    window = sorted(started)[:starts]
    total = sum(weights.values())
    rows: list[list[Any]] = []
    worst = 0.0
    for t, w in weights.items():
        got = sum(1 for _, who in window if who == t) / len(window)
        want = w / total
        worst = max(worst, abs(got - want) / want)
        rows.append([t, w, f"{want * 100:.1f}%", f"{got * 100:.1f}%",
                     f"{(got - want) / want * 100:+.1f}%"])
    print(table(["tenant", "weight", "fair share", "measured", "off by"], rows))
    print(f"\nfirst {len(window)} runs started on a full host of {capacity} slots; "
          f"worst relative error {worst * 100:.1f}% (target: within 10%)\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=10, help="runs per subject for start")
    ap.add_argument("--requests", type=int, default=1000, help="GETs for status")
    ap.add_argument("--starts", type=int, default=48, help="runs started counted for share")
    ap.add_argument("--capacity", type=int, default=4, help="slots for share")
    ap.add_argument("--only", nargs="+", choices=["start", "status", "share"])
    args = ap.parse_args()
    ensure_image("base")
    print(machine() + "\n")
    only = set(args.only or ["start", "status", "share"])
    if "start" in only:
        bench_start(args.n)
    if "status" in only:
        bench_status(args.requests)
    if "share" in only:
        bench_share(args.starts, args.capacity)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
