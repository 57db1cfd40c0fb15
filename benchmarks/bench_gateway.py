"""What the provider gateway costs: added latency per request and streaming throughput.

Both sides are measured in the same run against the same scripted upstream (the
real Anthropic Messages wire format): the baseline is a client calling the upstream
directly over TCP, the subject is the same client going through the gateway's unix
socket (policy checks, credential injection, usage metering, one flushed event per
request to a JSONL log). Run it from the repository root:

    .venv/bin/python benchmarks/bench_gateway.py [--requests 400] [--stream-mb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from runner.events.budgets import Budgets
from runner.events.log import EventLog
from runner.gateway import ProviderGateway
from runner.policy.models import ProviderPolicy
from runner.testing import LoopThread, RecordedRequest, ScriptedProvider

KEY = "sk-bench-0123456789abcdef"
MODEL = "claude-sonnet-4-6"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def timed(n: int, fn: Callable[[], None], warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def interleaved(n: int, a: Callable[[], None], b: Callable[[], None], warmup: int = 20
                ) -> tuple[list[float], list[float]]:
    """Alternate a and b call by call, so that a shared machine's load hits both alike."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for i in range(n):
        for fn, out in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return ta, tb


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in milliseconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def serve_upstream(chunk_chars: int, big_bytes: int) -> None:
    """Child process: the scripted upstream; a request with max_tokens=999999 gets
    the big stream, any other a short answer."""
    big_text = "x" * big_bytes

    def responder(req: RecordedRequest) -> dict[str, str]:
        body = req.body or {}
        return {"text": big_text if body.get("max_tokens") == 999999 else "Hello, bench."}

    with ScriptedProvider(responder, api_key=KEY, chunk_chars=chunk_chars) as up:
        print(up.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def serve_gateway(upstream: str, work: Path) -> None:
    """Child process: the gateway, as the orchestrator runs it (loop in a thread)."""
    log = EventLog(work / "events.jsonl", "bench")
    provider = ProviderPolicy(backend="anthropic", base_url=upstream, api_key_env="BENCH_KEY",
                              models={"default": MODEL})
    with LoopThread() as lt:
        gw = ProviderGateway(provider, work / "gw.sock", log, Budgets({}, log),
                             environ={"BENCH_KEY": KEY})
        lt.run(gw.start())
        print("ready", flush=True)
        sys.stdin.read()
        lt.run(gw.aclose())
    log.close()


def child(*argv: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=400, help="requests per latency series")
    ap.add_argument("--stream-mb", type=float, default=8.0, help="size of the big stream")
    ap.add_argument("--chunk-chars", type=int, default=1024, help="text per SSE event")
    ap.add_argument("--rounds", type=int, default=3, help="throughput rounds (best is kept)")
    ap.add_argument("--serve", choices=["upstream", "gateway"], help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    big_bytes = int(args.stream_mb * 1024 * 1024)
    if args.serve == "upstream":
        return serve_upstream(args.chunk_chars, big_bytes)
    if args.serve == "gateway":
        return serve_gateway(args.upstream, args.work)

    # Three processes, as in a real run: client, gateway, upstream (no shared GIL).
    work = Path(tempfile.mkdtemp(prefix="airlock-bench-"))
    up = child("--serve", "upstream", "--chunk-chars", str(args.chunk_chars),
               "--stream-mb", str(args.stream_mb))
    assert up.stdout is not None
    upstream = up.stdout.readline().strip()
    gw = child("--serve", "gateway", "--upstream", upstream, "--work", str(work))
    assert gw.stdout is not None
    assert gw.stdout.readline().strip() == "ready"
    small = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    try:
        direct = httpx.Client(base_url=upstream, headers={"x-api-key": KEY}, timeout=120)
        via = httpx.Client(transport=httpx.HTTPTransport(uds=str(work / "gw.sock")),
                           base_url="http://127.0.0.1:8011",
                           headers={"x-api-key": "placeholder"}, timeout=120)
        rows = []
        cpu: dict[str, float] = {}
        for label, body in (("non-streaming", small), ("streaming", {**small, "stream": True})):
            def call(client: httpx.Client, b: dict[str, object] = body) -> None:
                r = client.post("/v1/messages", json=b)
                r.read()
                assert r.status_code == 200, r.text

            c0 = cpu_ms(gw.pid)
            d, g = interleaved(args.requests, lambda: call(direct), lambda: call(via))
            cpu[label] = (cpu_ms(gw.pid) - c0) / (args.requests + 20)
            rows.append((label, d, g))

        big = {**small, "max_tokens": 999999, "stream": True}

        def stream_once(client: httpx.Client) -> tuple[float, int]:
            t0 = time.perf_counter()
            n = 0
            with client.stream("POST", "/v1/messages", json=big) as r:
                for chunk in r.iter_raw():
                    n += len(chunk)
            return time.perf_counter() - t0, n

        thr = {}
        for name, client in (("direct", direct), ("gateway", via)):
            stream_once(client)  # warm-up
            thr[name] = min((stream_once(client) for _ in range(args.rounds)),
                            key=lambda x: x[0])
        direct.close()
        via.close()
    finally:
        for proc in (gw, up):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=30)
        events = [json.loads(x) for x in (work / "events.jsonl").read_text().splitlines()]
        shutil.rmtree(work, ignore_errors=True)

    print(f"# gateway overhead: {platform.python_implementation()} "
          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.requests} requests per series")
    print()
    print("| small Messages call | direct p50 | direct p99 | gateway p50 "
          "| gateway p99 | added p50 | added p99 | gateway CPU per request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, d, g in rows:
        dp50, dp99 = percentile(d, 50), percentile(d, 99)
        gp50, gp99 = percentile(g, 50), percentile(g, 99)
        print(f"| {label} | {dp50:.2f} ms | {dp99:.2f} ms | {gp50:.2f} ms | {gp99:.2f} ms "
              f"| {gp50 - dp50:+.2f} ms | {gp99 - dp99:+.2f} ms | {cpu[label]:.2f} ms |")
    print("\n(direct and gateway calls alternate; CPU: the gateway process's user + system time)")
    print()
    print(f"| streaming {args.stream_mb:g} MiB as {args.chunk_chars}-char SSE deltas "
          "| seconds | MiB/s | events/s |")
    print("|---|---:|---:|---:|")
    events_n = big_bytes // args.chunk_chars + 6
    for name, (secs, nbytes) in thr.items():
        print(f"| {name} | {secs:.3f} | {nbytes / secs / 2**20:.1f} | {events_n / secs:,.0f} |")
    ratio = thr["gateway"][0] / thr["direct"][0]
    reqs = [e for e in events if e["type"] == "provider.request"]
    print(f"\nthroughput through the gateway: {1 / ratio:.0%} of direct; mean plain call: "
          f"direct {statistics.mean(rows[0][1]):.2f} ms, gateway "
          f"{statistics.mean(rows[0][2]):.2f} ms; {len(reqs)} provider.request events logged")


if __name__ == "__main__":
    main()
