"""Running the suite: a few sandbox runs under the policy, then one verdict per attack.

    suite = Suite(load_policy("strict").policy, runtime="runsc")
    report = suite.run()            # every attack
    report.exit_code                # 0 only when every attack was blocked

What happens:
1. Set-up on the host: canary listeners (one port per network attack, on every
   interface), an echoing provider upstream on 127.0.0.1 with a canary key, a decoy unix
   socket, a host environment variable, a workspace with a file hardlinked to a file
   outside it, and a private runs directory.
2. If a neighbour attack is selected, a second run (the "neighbour") is started first
   and kept alive while the others run.
3. The batches (see attacks.BATCHES) run concurrently, each one sandbox with the probe
   as its command. Every sandbox's policy is the policy under test with the readiness
   gate off (the suite observes the boundary itself; the gate would stop a weakened run
   before its attacks), no MCP servers, the canary provider, and a wall time of at most
   120 s. The workspace batch uses a copy-mode workspace when the policy says ro; the
   proxy batch uses network mode proxy with the canary's localhost ports allowed.
4. Verdicts: what the probe reported, plus what only the host can see (canary hits,
   its own files after the run, the event log, the key compared with found tokens).

Expectations (pids, memory, tmpfs sizes, nofile, output budget) always come from the
policy under test, even when the sandbox runs under a weakened counterpart: that is
what lets a weakened run show the escape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.agents.command import CommandAgent
from runner.conformance.attacks import Attack, select
from runner.conformance.canary import Canary, Decoy, EchoUpstream
from runner.conformance.engine import CreateHook, RecordingEngine
from runner.engines import Engine
from runner.errors import AirlockError, BadInput, NotReady
from runner.events.verify import verify_log
from runner.images.custom import run_image
from runner.policy.compile import GVISOR_PTRACE_RUNTIME, RUN_DIR_IN_SANDBOX
from runner.policy.loader import policy_from_dict
from runner.policy.models import Policy
from runner.run.hostaddrs import host_addresses
from runner.run.orchestrator import Run, RunOptions, with_agent_tmpfs
from runner.run.pool import Pool, Recipe
from runner.run.report import RunResult
from runner.run.wiring import PORTS

MARK = "@@airlock-conformance@@ "
PROBE_SOURCE_PATH = Path(__file__).resolve().parent / "probe.py"
KEY_PREFIX = "sk-airlock-canary-"
HOST_ENV_NAME = "CONFORMANCE_HOST_CANARY"
HOST_ENV_PREFIX = "airlock-host-canary-"
MODEL = "conformance-model"
MAX_WALL = 120.0
DISK_COPY_SIZE = 64 << 20  # the disk batch's copy_size, at most
DISK_FILE_SIZE = 8 << 20  # and its patch_file_size
# How long a sandbox may go on after its output budget was exceeded before the suite
# calls the budget unenforced (the host should end it at once).
OUTPUT_GRACE = 15.0


# -- weakenings (the mechanism; the catalog is weakened.py) ------------------------------


@dataclass(frozen=True)
class Weakening:
    """A deliberately weakened policy or setting under which `targets` must escape."""

    name: str
    targets: tuple[str, ...]
    kind: str  # policy | setting | policy+setting
    how: str
    runtimes: tuple[str, ...] = ("runc", "runsc")
    runsc_targets: tuple[str, ...] | None = None  # when runsc shows fewer escapes
    policy: Callable[[Context, str, dict[str, Any]], None] | None = None
    create: Callable[[Context], CreateHook] | None = None
    patch: Callable[[Context], contextlib.AbstractContextManager[Any]] | None = None
    workspace: Callable[[Context], Path] | None = None  # the main batch's workspace
    on_run: Callable[[Context, Run], None] | None = None
    prepare: Callable[[Context], None] | None = None

    def targets_for(self, runtime: str) -> tuple[str, ...]:
        if runtime == "runsc" and self.runsc_targets is not None:
            return self.runsc_targets
        return self.targets


# -- results -------------------------------------------------------------------------------


@dataclass
class AttackResult:
    id: str
    category: str
    tries: str
    expected: str
    observed: str
    verdict: str  # blocked | escaped | error
    batch: str
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SuiteReport:
    policy: str
    runtime: str
    results: list[AttackResult]
    duration_s: float
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    weakening: str | None = None

    @property
    def escaped(self) -> list[AttackResult]:
        return [r for r in self.results if r.verdict == "escaped"]

    @property
    def errors(self) -> list[AttackResult]:
        return [r for r in self.results if r.verdict == "error"]

    @property
    def exit_code(self) -> int:
        return 0 if all(r.verdict == "blocked" for r in self.results) else 1

    def verdict(self, attack_id: str) -> str | None:
        for r in self.results:
            if r.id == attack_id:
                return r.verdict
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "runtime": self.runtime, "weakening": self.weakening,
            "duration_s": self.duration_s,
            "summary": {"attacks": len(self.results),
                        "blocked": sum(r.verdict == "blocked" for r in self.results),
                        "escaped": len(self.escaped), "errors": len(self.errors)},
            "runs": self.runs,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass
class Outcome:
    """One batch's sandbox run, as the host saw it."""

    batch: str
    result: RunResult | None = None
    error: str | None = None
    probe: dict[str, dict[str, Any]] = field(default_factory=dict)
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_bytes: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    run_dir: Path | None = None
    seconds: float = 0.0
    watchdog: str | None = None

    @property
    def ended(self) -> str:
        if self.result is None:
            return f"the run failed: {self.error}"
        return f"run {self.result.status}, exit {self.result.exit_code}"


# -- the host-side context ------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link -> {os.readlink(p)}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = "file " + hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            else:
                out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else f"mode {st.st_mode:o}"
    return out


class Context:
    """Everything the suite sets up on the host for one suite run, torn down at the end."""

    def __init__(self, attacks: list[Attack], client: Any) -> None:
        self.client = client
        self.nonce = secrets.token_hex(8)
        self.tmp = Path(tempfile.mkdtemp(prefix="airlock-conformance-"))
        self.runs_dir = self.tmp / "runs"
        self.runs_dir.mkdir(mode=0o700)
        self.host_addrs = host_addresses()
        self.bridge_gateways = self._bridge_gateways()
        self.key = KEY_PREFIX + secrets.token_hex(16)
        self.key_file = self.tmp / "provider.key"
        self.key_file.write_text(self.key)
        self.key_file.chmod(0o600)
        self.host_env_value = HOST_ENV_PREFIX + secrets.token_hex(16)
        self.resolver_log: list[str] = []
        self.neighbour: dict[str, Any] | None = None
        self.neighbour_events: list[dict[str, Any]] = []
        self._closers: list[Callable[[], None]] = []
        try:
            self.canary = Canary([a.id for a in attacks if a.canary])
            self._closers.append(self.canary.close)
            self.echo = EchoUpstream()
            self._closers.append(self.echo.close)
            self.decoy = Decoy(self.tmp / "decoy")
            self._closers.append(self.decoy.close)
            self._workspace()
        except BaseException:
            self.close()
            raise

    def _bridge_gateways(self) -> list[str]:
        """The host's addresses on the engine's bridge networks (docker0's 172.17.0.1)."""
        import ipaddress

        out: list[str] = []
        try:
            nets = self.client.networks.list(filters={"driver": "bridge"})
            for net in nets:
                for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
                    if cfg.get("Gateway"):
                        out.append(str(cfg["Gateway"]))
                    with contextlib.suppress(ValueError, KeyError):
                        subnet = ipaddress.ip_network(cfg["Subnet"], strict=False)
                        out += [a for a in self.host_addrs if ipaddress.ip_address(a) in subnet]
        except Exception:
            pass
        # Only addresses on this machine: a gateway the host does not hold is not ours.
        return sorted({a for a in out if a in self.host_addrs})

    def _workspace(self) -> None:
        self.outside = self.tmp / "outside"
        self.outside.mkdir(mode=0o777)
        self.outside.chmod(0o777)
        self.symlink_target = self.outside / "symlink-target.txt"
        self.symlink_target.write_text(f"outside-secret-{self.nonce}\n")
        self.hardlink_target = self.outside / "hardlink-target.txt"
        self.hardlink_target.write_text(f"hardlink-secret-{self.nonce}\n")
        self.origin = self.tmp / "workspace"
        self.origin.mkdir()
        (self.origin / "notes.txt").write_text("notes\n")
        os.link(self.hardlink_target, self.origin / "shared.txt")
        for p in (self.symlink_target, self.hardlink_target, self.origin / "notes.txt"):
            p.chmod(0o666)
        self.origin.chmod(0o777)
        self.origin_before = _snapshot(self.origin)
        self.outside_before = _snapshot(self.outside)

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def _host_env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def _proxy_guard(ctx: Context) -> Iterator[None]:
    """The proxy's resolver and connector, for the suite's runs: names resolve only to
    this machine and connections go only to this machine, so even a proxy that let an
    attack through could not send a packet elsewhere. Every name asked is recorded."""
    import ipaddress

    from runner.gateway import proxy as proxy_mod

    real_connect = proxy_mod.connect_address
    own = {ipaddress.ip_address(a) for a in ctx.host_addrs}

    async def resolver(host: str, port: int) -> list[str]:
        ctx.resolver_log.append(host)
        name = host.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return ["127.0.0.1", "::1"]
        if name.endswith(".airlock-conformance.invalid"):
            return ["127.0.0.1"]
        raise OSError(f"airlock conformance: {host} is not resolved (no real DNS in the suite)")

    async def connector(address: Any, port: int) -> Any:
        if not (address.is_loopback or address in own):
            raise ConnectionRefusedError(f"airlock conformance: {address} is off this machine")
        return await real_connect(address, port)

    saved = (proxy_mod.system_resolver, proxy_mod.connect_address)
    proxy_mod.system_resolver = resolver
    proxy_mod.connect_address = connector
    try:
        yield
    finally:
        proxy_mod.system_resolver, proxy_mod.connect_address = saved


# -- the suite ------------------------------------------------------------------------------


class Suite:
    def __init__(self, policy: Policy, *, runtime: str | None = None,
                 weakening: Weakening | None = None, client: Any = None,
                 pooled: bool = False) -> None:
        self.base = policy
        # Each batch without a workspace runs in a sandbox claimed from a warm pool
        # (started before the run existed), as pooled runs of the service do.
        self.pooled = pooled
        self.runtime = runtime or policy.process.runtime
        # runsc-ptrace is the same boundary as runsc (one Sentry); only its platform differs
        self.platform = policy.process.gvisor_platform
        if self.runtime == GVISOR_PTRACE_RUNTIME:
            self.runtime, self.platform = "runsc", "ptrace"
        elif runtime == "runsc":  # the engine names, as --runtime takes them
            self.platform = "systrap"
        if self.runtime not in ("runc", "runsc"):
            raise NotReady(f"unknown runtime {self.runtime!r} (runc, runsc, {GVISOR_PTRACE_RUNTIME})")
        self.weakening = weakening
        self._client = client

    # -- policies and probe configuration -------------------------------------------------

    def limits(self) -> dict[str, Any]:
        r = self.base.resources
        return {"pids": r.pids, "memory": r.memory, "nofile": r.nofile,
                "output_bytes": r.output_bytes, "tmpfs": dict(self.base.filesystem.tmpfs)}

    def batch_policy(self, ctx: Context, batch: str, attacks: list[Attack]) -> Policy:
        d = self.base.model_dump(mode="json")
        d["extends"] = None
        d["name"] = f"{self.base.name or 'policy'}/conformance-{batch}"
        d["process"]["runtime"] = self.runtime
        d["process"]["gvisor_platform"] = self.platform
        d["readiness"] = {"selftest": False}
        d["mcp"] = {}
        d["resources"]["wall_time"] = min(self.base.resources.wall_time, MAX_WALL)
        d["provider"] = None
        if batch == "main" and any(a.id in ("sec.provider-key", "sec.key-reflection")
                                   for a in attacks):
            d["provider"] = {"backend": "openai-compatible", "base_url": ctx.echo.base_url,
                             "api_key_file": str(ctx.key_file), "models": {"default": MODEL}}
        if batch in ("workspace", "disk") and d["filesystem"]["workspace"] == "ro":
            d["filesystem"]["workspace"] = "copy"
        if batch == "disk":
            # The policy's own caps, down to a size this host fills in a moment (a full
            # 1 GiB copy would be charged to a 1 GiB sandbox and end it by OOM first).
            fs = d["filesystem"]
            fs["copy_size"] = min(self.base.filesystem.copy_size, DISK_COPY_SIZE)
            fs["patch_file_size"] = min(self.base.filesystem.patch_file_size, DISK_FILE_SIZE)
        if batch == "proxy":
            net = d["network"]
            net["mode"] = "proxy"
            net["allow"] = list(net.get("allow") or []) + [
                f"localhost:{ctx.canary.ports[aid]}"
                for aid in ("proxy.private-name", "proxy.host-mismatch")
                if aid in ctx.canary.ports]
        if self.weakening is not None and self.weakening.policy is not None:
            self.weakening.policy(ctx, batch, d)
        return policy_from_dict(d, name=f"conformance:{batch}")

    def probe_config(self, ctx: Context, batch: str, attacks: list[Attack],
                     policy: Policy) -> dict[str, Any]:
        runs_paths = [str(ctx.runs_dir)]
        for extra in (os.environ.get("AIRLOCK_RUNS_DIR"), str(Path("runs").resolve())):
            if extra and extra not in runs_paths:
                runs_paths.append(extra)
        return {
            "checks": [a.id for a in attacks],
            "nonce": ctx.nonce,
            "host_addrs": ctx.host_addrs,
            "bridge_gateways": ctx.bridge_gateways,
            "canary": ctx.canary.ports,
            "limits": self.limits(),
            "key_prefix": KEY_PREFIX,
            "host_env_prefix": HOST_ENV_PREFIX,
            "neighbour": ctx.neighbour,
            "runs_paths": runs_paths,
            "outside": {"symlink_target": str(ctx.symlink_target)},
            "decoy_socket": str(ctx.decoy.path),
            "proxy_port": PORTS["proxy"],
            "gateway_port": PORTS["provider"] if policy.provider is not None else None,
            "model": MODEL,
            "disk": {"copy_size": policy.filesystem.copy_size,
                     "patch_file_size": policy.filesystem.patch_file_size},
        }

    # -- running --------------------------------------------------------------------------

    def _engine(self, ctx: Context, *, victim: bool = False) -> RecordingEngine:
        hooks: list[CreateHook] = []
        if not victim and self.weakening is not None and self.weakening.create is not None:
            hooks.append(self.weakening.create(ctx))
        return RecordingEngine(ctx.client, hooks)

    def _run_batch(self, ctx: Context, batch: str, attacks: list[Attack]) -> Outcome:
        out = Outcome(batch)
        t0 = time.monotonic()
        buf = {"stdout": b""}
        lock = threading.Lock()

        def on_output(stream: str, chunk: bytes) -> None:
            with lock:
                out.output_bytes += len(chunk)
                if stream != "stdout":
                    return
                data = buf["stdout"] + chunk
                *lines, rest = data.split(b"\n")
                buf["stdout"] = rest[-(1 << 20):]
                for raw in lines:
                    self._take(out, raw)

        stack = contextlib.ExitStack()
        try:
            policy = self.batch_policy(ctx, batch, attacks)
            cfg = self.probe_config(ctx, batch, attacks, policy)
            workspace: Path | None = None
            if batch in ("workspace", "disk"):
                workspace = ctx.origin
            elif batch == "main" and self.weakening is not None and self.weakening.workspace:
                workspace = self.weakening.workspace(ctx)
            engine = self._engine(ctx)
            pool = self._warm_pool(engine, policy) if self.pooled and workspace is None else None
            if pool is not None:
                stack.callback(pool.close)
            run = Run(RunOptions(policy=policy, agent=CommandAgent(), task=["true"],
                                 workspace=workspace, engine=engine,
                                 runs_dir=ctx.runs_dir, on_output=on_output,
                                 listeners=[self._output_watchdog(ctx, out, engine)],
                                 host_addresses=ctx.host_addrs, pool=pool))
            out.run_id, out.run_dir = run.run_id, run.dir
            cfg["runs_paths"].append(str(run.dir))
            run.o.task = ["python3", "-I", "-c", PROBE_SOURCE_PATH.read_text(), json.dumps(cfg)]
            if self.weakening is not None and self.weakening.on_run is not None:
                self.weakening.on_run(ctx, run)
            out.result = run.execute()
            with lock:
                if buf["stdout"]:
                    self._take(out, buf["stdout"])
            out.events = _read_events(run.dir)
        except AirlockError as exc:
            out.error = str(exc)
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        finally:
            stack.close()
        out.seconds = round(time.monotonic() - t0, 2)
        return out

    @staticmethod
    def _warm_pool(engine: Engine, policy: Policy) -> Pool:
        """A pool holding one warm sandbox of exactly this batch's boundary."""
        agent = CommandAgent()
        recipe = Recipe(with_agent_tmpfs(policy, agent), run_image(policy.image, agent.image, engine))
        pool = Pool(engine, max_total=1)
        pool.add(recipe, 1)
        if not pool.wait_ready(recipe, 1, timeout=120):
            pool.close()
            raise NotReady("no pooled sandbox got warm for the suite")
        return pool

    @staticmethod
    def _output_watchdog(ctx: Context, out: Outcome, engine: RecordingEngine
                         ) -> Callable[[Any], None]:
        """After budget.exceeded the host must end the sandbox. If it is still running
        OUTPUT_GRACE seconds later, record that, and close the run's output stream so
        that the engine can end it after all (a container blocked on a full stdout pipe
        may not die of SIGKILL otherwise) and the suite is not held up for minutes."""
        exited = threading.Event()

        def drain() -> None:
            if exited.wait(OUTPUT_GRACE):
                return
            out.watchdog = (f"the sandbox was still running {OUTPUT_GRACE:g} s after its "
                            "output budget was exceeded")
            engine.close_output()

        def listen(event: Any) -> None:
            if event.type == "sandbox.exited":
                exited.set()
            elif event.type == "budget.exceeded":
                threading.Thread(target=drain, daemon=True, name="conformance-drain").start()

        return listen

    @staticmethod
    def _take(out: Outcome, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").strip("\r")
        if not line.startswith(MARK):
            return
        try:
            item = json.loads(line[len(MARK):])
        except ValueError:
            return
        if not isinstance(item, dict) or "id" not in item:
            return
        if item.get("partial"):
            out.partial[str(item["id"])] = item
        else:
            out.probe[str(item["id"])] = item

    def _start_neighbour(self, ctx: Context) -> tuple[Run, threading.Thread, RecordingEngine]:
        policy = self.batch_policy(ctx, "neighbour", [])
        marker = f"airlock-neighbour-{ctx.nonce}"
        engine = self._engine(ctx, victim=True)
        started = threading.Event()

        def listen(event: Any) -> None:
            if event.type in ("agent.started", "run.end"):
                started.set()

        run = Run(RunOptions(policy=policy, agent=CommandAgent(),
                             task=["python3", "-c", "import time; time.sleep(100)", marker],
                             engine=engine, runs_dir=ctx.runs_dir, listeners=[listen],
                             host_addresses=ctx.host_addrs))
        thread = threading.Thread(target=run.execute, name="conformance-neighbour", daemon=True)
        thread.start()
        if not started.wait(90) or not engine.sandboxes:
            raise NotReady("the neighbour run did not start")
        ctx.neighbour = {"run_id": run.run_id, "marker": marker,
                         "run_dir": engine.mount_source(RUN_DIR_IN_SANDBOX) or "",
                         "container": engine.sandboxes[0].id}
        return run, thread, engine

    def run(self, only: list[str] | None = None) -> SuiteReport:
        t0 = time.monotonic()
        attacks = select(only)
        if not attacks:
            raise BadInput(f"--only {' '.join(only or [])}: no attack id starts with it",
                           hint="`airlock conformance --json` lists every attack's id")
        client = self._client
        if client is None:
            from runner.engines.docker_engine import DockerEngine

            client = DockerEngine().client
        batches: dict[str, list[Attack]] = {}
        for a in attacks:
            batches.setdefault(a.batch, []).append(a)
        ctx = Context(attacks, client)
        outcomes: dict[str, Outcome] = {}
        neighbour: tuple[Run, threading.Thread, RecordingEngine] | None = None
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(_host_env(HOST_ENV_NAME, ctx.host_env_value))
                if "proxy" in batches:
                    stack.enter_context(_proxy_guard(ctx))
                w = self.weakening
                if w is not None and w.prepare is not None:
                    w.prepare(ctx)
                if w is not None and w.patch is not None:
                    stack.enter_context(w.patch(ctx))
                if any(a.id.startswith("sec.neighbour") for a in attacks):
                    neighbour = self._start_neighbour(ctx)
                try:
                    with ThreadPoolExecutor(max_workers=len(batches)) as pool:
                        futures = {b: pool.submit(self._run_batch, ctx, b, items)
                                   for b, items in batches.items()}
                        outcomes = {b: f.result() for b, f in futures.items()}
                finally:
                    if neighbour is not None:
                        n_run, n_thread, _ = neighbour
                        n_run.cancel()  # killed until it exits, as any run the host ends
                        n_thread.join(60)
                        ctx.neighbour_events = _read_events(n_run.dir)
            results = [self._verdict(ctx, a, outcomes[a.batch]) for a in attacks]
        finally:
            ctx.close()
        runs = {b: {"run_id": o.run_id, "status": o.result.status if o.result else "error",
                    "exit_code": o.result.exit_code if o.result else None,
                    "seconds": o.seconds, "error": o.error,
                    "pooled": any(e.get("type") == "sandbox.claimed" for e in o.events)}
                for b, o in outcomes.items()}
        shown = GVISOR_PTRACE_RUNTIME if (self.runtime, self.platform) == ("runsc", "ptrace") \
            else self.runtime
        return SuiteReport(policy=self.base.name or "policy", runtime=shown,
                           results=results, duration_s=round(time.monotonic() - t0, 2),
                           runs=runs, weakening=self.weakening.name if self.weakening else None)

    # -- verdicts -------------------------------------------------------------------------

    def _verdict(self, ctx: Context, attack: Attack, out: Outcome) -> AttackResult:
        r = out.probe.get(attack.id)
        escaped: bool | None = r.get("escaped") if r else None
        observed = str(r.get("observed", "")) if r else ""
        error = bool(r and r.get("error"))
        check = HOST_CHECKS.get(attack.id)
        if check is not None:
            h_escaped, note = check(self, ctx, out, r)
            if note:
                observed = f"{observed}; {note}" if observed else note
            if h_escaped is True:
                escaped, error = True, False
            elif h_escaped is False and escaped is None:
                escaped = False
        if r is None and escaped is None:
            observed = observed or f"no result from the probe ({out.ended})"
        if escaped is True:
            verdict = "escaped"
        elif escaped is False and not error:
            verdict = "blocked"
        else:
            verdict = "error"
        return AttackResult(attack.id, attack.category, attack.tries, attack.expected,
                            observed, verdict, attack.batch,
                            r.get("seconds") if r else None)


def _read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    out = []
    try:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    except OSError:
        pass
    return out


# -- host-side checks -----------------------------------------------------------------------

HostCheck = Callable[[Suite, Context, Outcome, "dict[str, Any] | None"], tuple[bool | None, str | None]]


def _canary(aid: str) -> HostCheck:
    def check(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
              ) -> tuple[bool | None, str | None]:
        hits = ctx.canary.hits_for(aid)
        if not hits:
            return None, "canary: no hit"
        peers = sorted({f"{h.proto} from {h.peer}" for h in hits})
        return True, f"CANARY HIT x{len(hits)} ({', '.join(peers)})"

    return check


def _fork_bomb(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
               ) -> tuple[bool | None, str | None]:
    if r is not None:
        return None, None
    limit = suite.limits()["pids"]
    p = out.partial.get("res.fork-bomb")
    forked = int(p["forked"]) if p else 0
    if forked >= limit:
        return True, f"{forked} processes before the sandbox ended (pids limit {limit})"
    if out.result is not None and out.result.status in ("failed", "oom", "succeeded"):
        return False, f"the sandbox was ended after at least {forked} processes ({out.ended})"
    return None, None


def _memory(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
            ) -> tuple[bool | None, str | None]:
    if r is not None:
        return None, None
    limit = suite.limits()["memory"]
    p = out.partial.get("res.memory")
    held = int(p["held"]) if p else 0
    if held > limit:
        return True, f"held {held >> 20} MiB before the end (limit {limit >> 20} MiB)"
    if out.result is not None and (out.result.status == "oom" or out.result.exit_code == 137):
        return False, f"OOM-killed after {held >> 20}+ MiB ({out.ended})"
    return None, None


def _output(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
            ) -> tuple[bool | None, str | None]:
    budget = suite.limits()["output_bytes"]
    got = out.output_bytes
    status = out.result.status if out.result else "?"
    note = f"host received {got} bytes (budget {budget}); {out.ended}"
    if out.watchdog:
        return True, f"BUDGET NOT ENFORCED: {out.watchdog}; {note}"
    if out.result is None:
        return None, None
    if status == "budget_exceeded" and got <= budget + (1 << 20):
        return False, note
    return True, note


def _tokens(value: Callable[[Context], str], what: str) -> HostCheck:
    def check(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
              ) -> tuple[bool | None, str | None]:
        if r is None:
            return None, None
        if value(ctx) in (r.get("tokens") or []):
            return True, f"THE {what} WAS FOUND"
        return False, f"the {what} is not among them"

    return check


def _reflection(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
                ) -> tuple[bool | None, str | None]:
    if r is None:
        return None, None
    upstream_saw = any(ctx.key in h.get("authorization", "") for h in ctx.echo.requests)
    note = f"upstream received the real key: {'yes' if upstream_saw else 'no'}"
    if ctx.key in (r.get("tokens") or []):
        return True, "THE REAL KEY CAME BACK; " + note
    return False, note


def _neighbour_files(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
                     ) -> tuple[bool | None, str | None]:
    refused = [e for e in ctx.neighbour_events if e.get("type") == "control.refused"]
    if refused:
        return True, f"the neighbour's control socket saw {len(refused)} stranger connection(s)"
    return None, "the neighbour's log shows no stranger"


def _forged(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
            ) -> tuple[bool | None, str | None]:
    if out.run_dir is None or not out.events:
        return None, None
    marker = "forged-" + ctx.nonce[::-1]
    forged = [e for e in out.events if marker in json.dumps(e)]
    trusted = [e for e in forged if e.get("source") != "agent"]
    problems = verify_log(out.run_dir / "events.jsonl", run_id=out.run_id or "")
    ends = [e for e in out.events if e.get("type") == "run.end"]
    last_is_end = bool(ends) and out.events[-1].get("type") == "run.end"
    note = (f"{len(forged)} log events carry the forgery, {len(trusted)} of them not "
            f"source=agent; chain: {'ok' if not problems else problems[0]}; "
            f"run.end events: {len(ends)}")
    if trusted or problems or len(ends) != 1 or not last_is_end:
        return True, "FORGED EVENTS TRUSTED: " + note
    if not forged:
        return None, "the forged lines are not in the log at all: " + note
    return False, note


def _control(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
             ) -> tuple[bool | None, str | None]:
    if not out.events:
        return None, None
    selftests = [e for e in out.events if e.get("type") == "selftest"]
    started = [e for e in out.events if e.get("type") == "agent.started"]
    refused = [e for e in out.events if e.get("type") == "control.refused"]
    note = f"control.refused x{len(refused)}; agent.started x{len(started)}"
    if selftests or len(started) > 1:
        return True, f"FORGED CONTROL MESSAGES BELIEVED ({len(selftests)} self-test); " + note
    return False, note


def _workspace_files(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
                     ) -> tuple[bool | None, str | None]:
    if out.result is None:
        return None, None
    after = _snapshot(ctx.origin)
    changed = sorted(k for k in set(after) | set(ctx.origin_before)
                     if after.get(k) != ctx.origin_before.get(k))
    outside_after = _snapshot(ctx.outside)
    outside_changed = sorted(k for k in outside_after
                             if outside_after[k] != ctx.outside_before.get(k))
    patch = (out.result.patch if out.result else None) or ""
    leaked = [s for s in (f"outside-secret-{ctx.nonce}", "root:x:0:0:") if s in patch]
    parts = [f"host workspace changed: {changed or 'no'}",
             f"files outside changed: {outside_changed or 'no'}",
             f"host content in the patch: {leaked or 'none'}"]
    note = "; ".join(parts)
    if changed or outside_changed or leaked:
        return True, "HOST FILES REACHED: " + note
    return False, note


def _decoy(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
           ) -> tuple[bool | None, str | None]:
    if ctx.decoy.connections:
        return True, f"the decoy socket saw {ctx.decoy.connections} connection(s)"
    return None, "the decoy socket saw no connection"


def _resolver(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
              ) -> tuple[bool | None, str | None]:
    asked = [n for n in ctx.resolver_log if ctx.nonce in n]
    if asked:
        return True, f"the proxy asked a resolver for {asked[0]}"
    return None, "no name reached the resolver"


def _disk(suite: Suite, ctx: Context, out: Outcome, r: dict[str, Any] | None
          ) -> tuple[bool | None, str | None]:
    res = out.result
    if res is None:
        return None, None
    left = {str(f.get("path")): str(f.get("reason"))
            for f in (res.left_out or {}).get("files", [])}
    caps = [e.get("data", {}).get("cap") for e in out.events if e.get("type") == "disk.exceeded"]
    ts = {str(e.get("type")): float(e.get("ts") or 0) for e in out.events}
    step = round(ts["workspace.patch"] - ts["sandbox.exited"], 3) \
        if "workspace.patch" in ts and "sandbox.exited" in ts else None
    note = (f"run {res.status}/{res.exit_reason}; disk.exceeded {caps}; left out {left}; "
            f"patch step {step} s")
    wrote = int((r or out.partial.get("res.workspace-disk") or {}).get("filled") or 0)
    if r is not None and r.get("escaped"):
        return True, f"WROTE PAST THE COPY'S CAP ({wrote >> 20} MiB more); " + note
    if f"edit-{ctx.nonce}" not in (res.patch or _patch_file(out)):
        return True, "THE AGENT'S EDIT WAS LOST; " + note
    wanted = {"airlock-probe-sparse.img": "file_size", "airlock-probe-big.bin": "file_size"}
    if res.exit_reason != "disk" or "copy_size" not in caps or \
            any(left.get(k) != v for k, v in wanted.items()):
        return True, "A CAP DID NOT HOLD; " + note
    return False, note


def _patch_file(out: Outcome) -> str:
    try:
        return (out.run_dir / "changes.patch").read_text(errors="replace") if out.run_dir else ""
    except OSError:
        return ""


HOST_CHECKS: dict[str, HostCheck] = {
    **{aid: _canary(aid) for aid in (
        "net.host-tcp", "net.host-ipv6", "net.loopback-canary", "net.udp", "net.dns-exfil",
        "net.bridge-gateway", "proxy.disallowed-port", "proxy.ip-literal",
        "proxy.private-name", "proxy.host-mismatch")},
    "proxy.dns-exfil": _resolver,
    "fs.workspace-symlink": _workspace_files,
    "fs.workspace-hardlink": _workspace_files,
    "fs.host-sockets": _decoy,
    "res.fork-bomb": _fork_bomb,
    "res.memory": _memory,
    "res.output-flood": _output,
    "res.workspace-disk": _disk,
    "sec.provider-key": _tokens(lambda c: c.key, "real provider key"),
    "sec.key-reflection": _reflection,
    "sec.host-env": _tokens(lambda c: c.host_env_value, "host variable's value"),
    "sec.neighbour-files": _neighbour_files,
    "log.forged-events": _forged,
    "log.control-forge": _control,
}
