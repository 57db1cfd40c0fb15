"""What the benchmarks share: percentiles, tables, the machine they ran on, a server."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (numbers right-aligned), ready for docs/performance.md."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    numeric = [bool(cells) and all(_numeric(r[i]) for r in cells) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                         for w, n in zip(widths, numeric, strict=True)) + "|"
    out = [line, sep]
    for r in cells:
        out.append("| " + " | ".join(c.rjust(w) if n else c.ljust(w)
                                     for c, w, n in zip(r, widths, numeric, strict=True)) + " |")
    return "\n".join(out)


def process_policy(runtime: str) -> dict[str, str]:
    """The policy's `process` settings for an engine runtime name (runsc-ptrace included)."""
    if runtime == "runsc-ptrace":
        return {"runtime": "runsc", "gvisor_platform": "ptrace"}
    return {"runtime": runtime}


def _numeric(text: str) -> bool:
    t = text.replace(",", "").replace("%", "").replace("x", "").replace("+", "").strip()
    try:
        float(t.split()[0] if t else "x")
    except ValueError:
        return False
    return True


def machine() -> str:
    """One paragraph naming the machine, the engine and the load while measuring."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    engine = "?"
    try:
        out = subprocess.run(["docker", "info", "--format",
                              "{{.ServerVersion}} {{.Driver}} cgroup{{.CgroupVersion}} "
                              "runtimes={{range $k, $v := .Runtimes}}{{$k}},{{end}}"],
                             capture_output=True, text=True, timeout=20)
        engine = out.stdout.strip().rstrip(",") or "?"
    except (OSError, subprocess.TimeoutExpired):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem} RAM; Linux {platform.release()}; "
            f"Docker {engine}; {platform.python_implementation()} {platform.python_version()}; "
            f"load average at start {load}")


@contextmanager
def serve(env: dict[str, str] | None = None) -> Iterator[tuple[dict[str, str], int]]:
    """An `airlock serve` on a private socket; yields the environment that reaches it
    and the server's pid."""
    tmp = Path(tempfile.mkdtemp(prefix="airlock-bench-serve-"))
    sock = tmp / "s" / "serve.sock"
    env = {**(env or os.environ), "AIRLOCK_SERVE_SOCKET": str(sock)}
    env.pop("AIRLOCK_NO_SERVE", None)
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "serve"], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening" not in (tmp / "serve.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("airlock serve did not start:\n"
                                 + (tmp / "serve.log").read_text())
            time.sleep(0.05)
        time.sleep(0.5)  # the first spare warms its engine connection
        yield env, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def auto_serve(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The default `airlock run`: it starts its own server when none answers. Yields
    the environment for that (a private socket, auto-start on); the server the first
    run starts is stopped at the end."""
    tmp = Path(tempfile.mkdtemp(prefix="airlock-bench-auto-"))
    sock = tmp / "s" / "serve.sock"
    env = {**env, "AIRLOCK_SERVE_SOCKET": str(sock), "AIRLOCK_AUTO_SERVE": "1"}
    env.pop("AIRLOCK_NO_SERVE", None)
    try:
        yield env
    finally:
        with contextlib.suppress(OSError, ValueError):
            pid = int(sock.with_suffix(".pid").read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_served(env: dict[str, str], timeout: float = 60) -> None:
    """Until the server at the environment's socket listens and has a warm spare."""
    log = Path(env["AIRLOCK_SERVE_SOCKET"]).parent / "serve.log"
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if "listening" in log.read_text():
                break
        if time.monotonic() > deadline:
            raise SystemExit("the auto-started server did not come up")
        time.sleep(0.05)
    time.sleep(0.5)  # the first spare warms its engine connection


def ensure_image(name: str = "base") -> str:
    """The image's tag, built if it is missing (as `make bench` does before running)."""
    from runner.images.build import image_tag

    tag = image_tag(name)
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "runner.cli", "images", "build", name],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return tag
