"""`airlock doctor`: is this machine ready, and if not, what fixes it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable

from runner.errors import AirlockError, ExitCode

# `--agent command` and the Python API's default agent; the others are built on demand.
REQUIRED_IMAGES = ("base", "builtin")


TYPE_CHECKING = False
if TYPE_CHECKING:
    from runner.engines import Engine


def _pools(engine: Engine, ok: Callable[[str], None], bad: Callable[[str, str], None]) -> None:
    """Warm pools' sandboxes: those of live pools, and any a dead pool left behind."""
    from runner.run.gc import owner_of
    from runner.run.owner import owner_alive

    pooled = [o for o in engine.managed() if o.kind == "container" and o.run_id.startswith("pool-")]
    dead = [o for o in pooled if not owner_alive(owner_of(o))]
    if dead:
        bad(f"{len(dead)} pooled sandbox(es) of a pool that is gone", "airlock gc")
    ok(f"warm pools: {len(pooled) - len(dead)} pooled sandbox(es) held by live pools "
       f"(AIRLOCK_POOL=0 turns the per-user server's pool off)")


# The first gVisor build whose statx accepts AT_NO_AUTOMOUNT, which coreutils always
# passes (measured: ../shared/research/engine-on-this-machine.md). Older ones answer
# `ls`, `stat`, `find` ... with EINVAL for every path.
GVISOR_MIN_DATE = "20240729"
GVISOR_FIX = ("install a newer runsc (scripts/fetch-runsc.sh fetches Debian 13's without "
              "touching the host's apt sources), point the engine's runsc runtime at it "
              "and reload the engine (kill -HUP dockerd)")


def gvisor_date(path: str) -> str | None:
    """The release date (YYYYMMDD) in a runsc binary's --version, when it can be run here."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(20\d{6})", out)
    return m.group(1) if m else None


def gvisor_finding(path: str | None) -> tuple[bool, str]:
    """(fit, message) for the runsc binary an engine runs."""
    date = gvisor_date(path) if path else None
    if date is None:
        return True, f"runsc at {path}: version not readable from here (a remote engine?)"
    if date < GVISOR_MIN_DATE:
        return False, (f"runtime runsc is gVisor {date}, older than {GVISOR_MIN_DATE}: its statx "
                       "rejects AT_NO_AUTOMOUNT, so coreutils' ls, stat and find fail with "
                       "'Invalid argument' inside runsc sandboxes (Python's os.stat works), and "
                       "Codex now and then never reaps a finished command there")
    return True, f"runtime runsc is gVisor {date}"


def run_doctor(policy_ref: str, *, probe: bool, echo: Callable[[str], None]) -> int:
    from runner.engines.docker_engine import connect
    from runner.engines.gvisor_flags import boundary_flags, registration_problem
    from runner.images.build import SPECS, image_tag
    from runner.images.catalog import load_catalog
    from runner.policy.compile import GVISOR_PTRACE_RUNTIME

    problems = 0

    def ok(msg: str) -> None:
        echo(f"ok    {msg}")

    def warn(msg: str, fix: str) -> None:
        # A limit, not a fault: runs work, some tools inside them do not.
        echo(f"WARN  {msg}\n      fix: {fix}")

    def bad(msg: str, fix: str) -> None:
        nonlocal problems
        problems += 1
        echo(f"FAIL  {msg}\n      fix: {fix}")

    try:
        engine = connect()
        info = engine.info()
        ok(f"engine: Docker {info.version} at {info.endpoint}")
        for rt in ("runc", "runsc", GVISOR_PTRACE_RUNTIME):
            if rt != "runc" and rt in info.runtimes:
                args = engine.runtime_args(rt)
                problem = registration_problem(rt, args)
                if problem is not None:
                    bad(f"runtime {rt}: {problem[0]} (without --oci-seccomp gVisor ignores "
                        "the seccomp profile)", problem[1])
                else:
                    ok(f"runtime {rt} registered with {' '.join(sorted(set(args)))}")
                fit, message = gvisor_finding(engine.runtime_path(rt))
                message = message.replace("runtime runsc ", f"runtime {rt} ", 1).replace(
                    "runsc at ", f"{rt} at ", 1)
                if fit:
                    ok(message)
                else:
                    warn(message, GVISOR_FIX)
            elif rt in info.runtimes:
                ok(f"runtime {rt} registered")
            elif rt == GVISOR_PTRACE_RUNTIME:
                # optional: only policies with process.gvisor_platform: ptrace need it
                echo(f"info  runtime {rt} is not registered (gVisor on its ptrace platform, for "
                     "hosts that keep many idle runs; register runsc again with "
                     "--platform=ptrace under that name to use it)")
            else:
                bad(f"runtime {rt} is not registered with the engine",
                    f"install gVisor and register runsc with {boundary_flags(rt)} (see "
                    "`make engine`)" if rt == "runsc" else "reinstall Docker")
        load_catalog()
        for name in SPECS:
            tag = image_tag(name)
            if engine.image_present(tag):
                ok(f"image {tag}")
            elif name in REQUIRED_IMAGES:
                bad(f"image {tag} is not built", f"airlock images build {name}")
            else:
                # An agent's own image matters only to runs of that agent.
                echo(f"--    image {tag} is not built (needed by --agent {name} or --image {name} only: "
                     f"airlock images build {name})")
        _pools(engine, ok, bad)
    except AirlockError as exc:
        bad(str(exc.message), exc.hint or "start a Docker Engine (in a checkout: `make engine`)")
    usage = shutil.disk_usage("/var/lib/docker" if shutil.os.path.isdir("/var/lib/docker") else "/")  # type: ignore[attr-defined]
    free_gb = usage.free / (1 << 30)
    if free_gb < 2:
        bad(f"free disk {free_gb:.1f} GiB", "free some disk space (images need ~1 GiB)")
    else:
        ok(f"free disk {free_gb:.1f} GiB")
    try:
        from runner.provider_doctor import check_provider

        problems += check_provider(policy_ref, probe=probe, ok=ok, bad=bad)
    except ImportError:
        pass
    return int(ExitCode.NOT_READY) if problems else 0
