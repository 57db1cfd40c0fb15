"""One run: prepare -> start services -> start sandbox -> stream & enforce -> tear down -> report.

Everything the run creates on the host (a private scratch directory with the sockets,
the workspace copy, the engine's container) is removed in `finally`, whatever ended
the run; `airlock gc` removes what a killed host process could not.
"""

from __future__ import annotations

import contextlib
import json
import marshal
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.agents import Agent, AgentContext
from runner.engines import Engine, Exit, Sandbox, get_engine
from runner.errors import AirlockError, BadInput, ExitCode
from runner.events import BudgetExceeded, Budgets, Event, EventLog, clip, clip_text
from runner.events.limits import HostLimits
from runner.images.custom import run_image
from runner.policy.compile import RUN_DIR_IN_SANDBOX, SandboxInputs, container_spec, engine_runtime
from runner.policy.loader import over_preset, policy_digest
from runner.policy.models import SANDBOX_HOME, WORKSPACE_PATH, Policy, widenings
from runner.run import workspace as ws_mod
from runner.run.control import ControlServer
from runner.run.guard import check_model, check_workspace
from runner.run.owner import owner_label
from runner.run.pool import Recipe, SandboxSource, WarmSandbox, make_scratch
from runner.run.reaper import ensure_reaper, needs_gc
from runner.run.report import RunResult, write_report
from runner.run.services import ServiceHost

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_EVENT_CAP = 8192  # bytes of output text carried by one agent.output event
COPY_POLL = 0.5  # seconds between looks at how full the workspace copy is
LEFT_OUT_IN_EVENT = 100  # left-out files named in the event (report.json lists up to 1000)
MAX_PARTIAL_LINE = 1 << 20  # an unfinished output line longer than this is not parsed
# How long after the engine reports a failed gVisor sandbox's exit it may still report
# the OOM kill that caused it (seen: up to 0.15 s, under load on 2 cores).
LATE_OOM_WAIT = 0.5
# A run the host ends has its sandbox killed until the engine reports the exit: a try is
# a kill (then a removal), and ends when the engine refuses it or after KILL_TRY_S without
# the exit (the engine itself waits ~12 s before it answers that a kill failed). After
# every try the run stops waiting and leaves the container to `airlock gc`.
KILL_TRIES = 3
KILL_TRY_S = 15.0
KILL_PAUSE_S = 1.0  # between a refused try and the next
ABANDONED_RETRIES = 20  # removals of an abandoned sandbox, ABANDONED_RETRY_S apart
ABANDONED_RETRY_S = 30.0


def with_agent_tmpfs(policy: Policy, agent: Agent) -> Policy:
    """The agent's writable paths added as tmpfs, unless the policy sizes them itself."""
    missing = {k: v for k, v in agent.tmpfs.items() if k not in policy.filesystem.tmpfs}
    if not missing:
        return policy
    data = policy.model_dump(mode="json")
    data["filesystem"]["tmpfs"].update(missing)
    return Policy.model_validate(data)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def runs_dir() -> Path:
    return Path(os.environ.get("AIRLOCK_RUNS_DIR", "runs")).resolve()


@dataclass
class RunOptions:
    policy: Policy
    agent: Agent
    task: list[str]
    workspace: Path | None = None
    model: str | None = None
    engine: Engine | None = None
    runs_dir: Path | None = None
    record: Path | None = None
    python_tools: list[Callable[..., Any]] = field(default_factory=list)
    listeners: list[Callable[[Event], None]] = field(default_factory=list)
    # Raw agent output as it arrives (stream name, bytes): the console prints it.
    on_output: Callable[[str, bytes], None] | None = None
    host_addresses: list[str] = field(default_factory=list)
    # Warm sandboxes to claim from (see runner/run/pool.py); None: always cold.
    pool: SandboxSource | None = None
    # The preset the policy builds on (LoadedPolicy.preset): what the policy raises
    # above it is recorded as `policy.widened`.
    preset: str | None = None
    # Unix sockets of the caller's own (the per-user server's) that a workspace must not
    # expose; the engine's are always checked (runner/run/guard.py).
    protected_sockets: list[str] = field(default_factory=list)
    # The id to use, when the caller chose it (the service records a run before it starts).
    run_id: str | None = None
    # Where the run's credentials and `env.allow` values come from: the host's own
    # environment unless the caller builds one per run (the service, per tenant).
    environ: Mapping[str, str] | None = None

    @property
    def env_source(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ


class Run:
    def __init__(self, options: RunOptions) -> None:
        self.o = options
        self.policy = with_agent_tmpfs(options.policy, options.agent)
        self.run_id = options.run_id or new_run_id()
        base = options.runs_dir or runs_dir()
        # Refused before anything exists: a refused run leaves no directory behind.
        check_model(self.policy, options.model)
        self._sensitive = check_workspace(options.workspace, self.policy, base,
                                          options.protected_sockets)
        self.dir = base / self.run_id
        self.dir.mkdir(parents=True, exist_ok=False, mode=0o700)
        self._dir_lost = False
        self.log = EventLog(self.dir / "events.jsonl", self.run_id,
                            max_bytes=self.policy.resources.log_bytes, on_full=self._log_full)
        for listener in options.listeners:
            self.log.subscribe(listener)
        b = self.policy.budgets
        self.budgets = Budgets(
            {"steps": b.steps, "requests": b.requests, "tokens": b.tokens,
             "mcp_calls": b.mcp_calls, "output_bytes": self.policy.resources.output_bytes},
            self.log, self._on_budget,
        )
        lim = self.policy.network.limits
        self.host_limits = HostLimits(memory=lim.memory, refusals=lim.refusals,
                                      refusal_events=lim.refusal_events, sink=self.log,
                                      on_exceeded=self._on_host_limit)
        self._sandbox: Sandbox | None = None
        # budget | timeout | interrupted | disk | log | *_abuse | cancelled
        self._end_reason: str | None = None
        self._lock = threading.Lock()
        self._exited = threading.Event()  # the sandbox exited, or the run is over
        self._abandoned = threading.Event()  # no kill or removal ended it: not waited for
        self._started = False
        self._killing = False
        self._agent_started: float | None = None
        self._agent_ended: float | None = None
        self._refused: list[dict[str, Any]] = []
        self.log.subscribe(self._note_refusal)
        self._selftest: dict[str, Any] | None = None
        self._disk_noted = False
        self._agent_exit: int | None = None
        self.result_value: Any = None
        self.gateway: Any = None
        self.mcp_server: Any = None

    # -- enforcement -----------------------------------------------------------------

    def _control_refused(self) -> None:
        self.log.refusal("control.refused", "host", kind="connection")

    def end_for_abuse(self, reason: str) -> None:
        """A host service of the run was pushed past its limits over and over (reason:
        `mcp_abuse`, ...): its event is recorded; the run ends."""
        self._end(reason)

    def _log_full(self, why: str) -> None:
        # Whatever the sandbox does next would go unrecorded: the run ends here.
        self._end("log")

    def _note_refusal(self, event: Event) -> None:
        refusal = event.type.endswith((".refused", ".unauthorized"))
        if event.trusted and refusal and len(self._refused) < 200:
            d = event.data
            what = d.get("target") or d.get("tool") or d.get("model") or d.get("path")
            # report.json is read by people and tools: the sandbox's strings clipped.
            self._refused.append({"seq": event.seq, "type": event.type,
                                  "reason": clip(d.get("reason"), 200), "what": clip(what, 512)})

    def _end(self, reason: str) -> None:
        with self._lock:
            if self._end_reason is None:
                self._end_reason = reason
            sandbox = self._sandbox if self._started else None
        if sandbox is not None:  # not started yet: _run_sandbox sees the reason and kills
            self._kill(sandbox)

    def _kill(self, sandbox: Sandbox) -> None:
        # Never on the caller's thread: it may be the output pump (whose draining the
        # engine needs before the container can die: under gVisor a kill waited on it
        # forever) or the services' event loop (which must keep answering meanwhile).
        # One killer per run, however often the run is ended (a flood of refusals).
        with self._lock:
            if self._killing:
                return
            self._killing = True
        threading.Thread(target=self._kill_until_exited, args=(sandbox,),
                         name="airlock-kill", daemon=True).start()

    def _kill_until_exited(self, sandbox: Sandbox) -> None:
        """Kill until the engine reports the exit; then remove; then stop waiting for it.

        One kill is not enough: a loaded engine can refuse it (it waited for an exit event
        that did not come) or the call can fail, and a run that trusted it lasted as long
        as its command, past its wall time or its cancel.
        """
        tries: list[tuple[str, Callable[[], None]]] = \
            [("kill", sandbox.kill)] * KILL_TRIES + [("remove", sandbox.remove)]
        for n, (what, call) in enumerate(tries, 1):
            if self._try_to_end(what, n, call):
                return
        if self._exited.is_set():
            return
        needs_gc()
        self.log.emit("sandbox.abandoned", "host",
                      detail=f"still running after {KILL_TRIES} kills and a removal; the "
                             "run ends without it; removal is retried (and `airlock gc`)")
        self._abandoned.set()
        # A long-lived process (the service) would otherwise keep it until it exits.
        for _ in range(ABANDONED_RETRIES):
            time.sleep(ABANDONED_RETRY_S)
            with contextlib.suppress(Exception):
                sandbox.remove()
                return

    def _try_to_end(self, what: str, attempt: int, call: Callable[[], None]) -> bool:
        """One try in its own thread (a call stuck in the engine does not hold the next);
        True once the sandbox has exited."""
        refused = threading.Event()

        def run() -> None:
            try:
                call()
            except Exception as exc:
                if not self._exited.is_set():
                    self.log.emit("sandbox.kill_failed", "host", call=what, attempt=attempt,
                                  error=clip_text(f"{type(exc).__name__}: {exc}", 300))
                refused.set()

        threading.Thread(target=run, name="airlock-kill", daemon=True).start()
        deadline = time.monotonic() + KILL_TRY_S
        while not self._exited.wait(0.1):
            if refused.is_set():
                return self._exited.wait(KILL_PAUSE_S)
            if time.monotonic() > deadline:
                return False
        return True

    def cancel(self) -> None:
        """End the run from another thread: the sandbox is killed, or never started."""
        self.log.emit("run.cancel", "host")
        self._end("cancelled")

    def _on_budget(self, exc: BudgetExceeded) -> None:
        self._end("budget")

    def _on_host_limit(self, limit: str) -> None:
        self._end("host_limit")

    def _on_control(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "agent.started":
            self._agent_started = time.monotonic()
            self.log.emit("agent.started", "host", pid=msg.get("pid"))
        elif kind == "selftest":
            self._selftest = msg
            self.log.emit("selftest", "host", ok=bool(msg.get("ok")),
                          checks=msg.get("checks", []), runtime=msg.get("runtime"))
        elif kind == "agent.exit":
            self._agent_exit = msg.get("code")
            self._agent_ended = time.monotonic()
        elif kind == "shim.ready":
            self.log.emit("sandbox.ready", "host")

    # -- the run -----------------------------------------------------------------------

    def execute(self) -> RunResult:
        with self._ctrl_c_ends_the_run():
            return self._execute()

    @contextlib.contextmanager
    def _ctrl_c_ends_the_run(self) -> Any:
        """On the main thread, a first Ctrl-C ends the run as `cancel()` does.

        A KeyboardInterrupt raised wherever the main thread happens to be can land between
        taking a lock and the `try` that releases it (or inside the engine client's
        request), and what follows may then wait forever. So the handler only sets an
        event; a thread of the run's own ends it, the sandbox is killed, and the run ends
        as `interrupted` through its ordinary path. A second Ctrl-C raises
        KeyboardInterrupt, as before. An ignored SIGINT (`nohup`, `cmd &` in a script)
        stays ignored.
        """
        import signal

        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return
        pressed = threading.Event()
        over = threading.Event()

        def on_sigint(signum: int, frame: object) -> None:
            if pressed.is_set():
                raise KeyboardInterrupt
            pressed.set()

        def watch() -> None:
            pressed.wait()  # set by Ctrl-C, or at the run's end with `over`
            if not over.is_set():
                self.log.emit("run.interrupt", "host")  # heard: what follows is the kill
                self._end("interrupted")

        watcher = threading.Thread(target=watch, name="airlock-ctrl-c", daemon=True)
        watcher.start()
        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            over.set()
            pressed.set()  # wakes the watcher, which then ends

    def _execute(self) -> RunResult:
        t0 = time.monotonic()
        p = self.policy
        agent = self.o.agent
        self.log.emit("run.start", "host", agent=agent.name, policy=p.name,
                      policy_digest=policy_digest(p), runtime=p.process.runtime,
                      **({"gvisor_platform": p.process.gvisor_platform}
                         if p.process.runtime == "runsc" else {}),
                      network=p.network.mode, workspace_mode=p.filesystem.workspace,
                      task=self.o.task)
        for w in widenings(p):
            self.log.emit("policy.widened", "host", detail=w)
        if self._sensitive is not None:
            self.log.emit("policy.widened", "host",
                          detail=f"filesystem.allow_sensitive_workspace: {self.o.workspace} "
                          f"is mounted although {self._sensitive}",
                          key="filesystem.allow_sensitive_workspace")
        for over in over_preset(self.o.preset, self.o.policy):
            self.log.emit("policy.widened", "host", detail=f"{over} above the preset {self.o.preset}",
                          key=over.key, preset=self.o.preset, preset_value=over.floor,
                          value=over.candidate)
        (self.dir / "policy.json").write_text(json.dumps(p.model_dump(mode="json"), indent=2))

        ensure_reaper()
        scratch: Path | None = None
        warm: WarmSandbox | None = None
        services = ServiceHost()
        control: ControlServer | None = None
        prepared: ws_mod.PreparedWorkspace | None = None
        exit_code: int = ExitCode.AGENT_FAILED
        status, reason = "error", "error"
        patch_text = ""
        left_out: dict[str, Any] | None = None
        image = ""
        image_digest: str | None = None
        error: str | None = None
        try:
            engine = self.o.engine or get_engine()
            image = run_image(p.image, agent.image, engine)
            fs = p.filesystem
            pooled = (ws_mod.pooled_mode(self.o.workspace, fs.workspace)
                      if self.o.pool is not None else None)
            if self.o.pool is not None and pooled is not None:
                warm = self.o.pool.claim(Recipe(p, image, pooled))
            if warm is not None:
                scratch, run_dir, etc = warm.scratch, warm.run_dir, warm.etc_dir
                with self._lock:
                    self._sandbox = warm.sandbox
            else:
                # No separate presence check: create() answers a missing image with NotReady.
                scratch, run_dir, etc = make_scratch()

            uid, _, gid = p.process.user.partition(":")
            limits = ws_mod.CopyLimits(fs.copy_size, fs.copy_files)
            if warm is not None and warm.workspace_dir is not None and self.o.workspace:
                prepared = ws_mod.fill_pooled(self.o.workspace, fs.workspace, warm.workspace_dir,
                                              int(uid), int(gid or uid), limits)
            else:
                prepared = ws_mod.prepare(self.o.workspace, fs.workspace, scratch,
                                          int(uid), int(gid or uid), limits)
            if prepared.copy is not None:
                self.log.emit("workspace.copy", "host", size_cap=fs.copy_size,
                              files_cap=fs.copy_files)
            if prepared.writable and prepared.copy is None:
                self.log.emit("workspace.writable", "host", path=str(prepared.origin))

            bridges, endpoints = self._start_services(services, run_dir)
            control = ControlServer(run_dir / "control.sock", self._on_control,
                                    self._control_refused)
            ctx = AgentContext(policy=p, task=self.o.task, model=self._model(),
                               endpoints=endpoints,
                               workspace=WORKSPACE_PATH if prepared.host_path else None,
                               mcp_tools=list(self.mcp_server.tool_names) if self.mcp_server else [])
            env = self._agent_env(agent, ctx)
            shim_cfg = {
                "run_id": self.run_id,
                "argv": agent.argv(ctx),
                "env": env,
                "cwd": WORKSPACE_PATH if prepared.host_path else SANDBOX_HOME,
                "bridges": bridges,
                "control": f"{RUN_DIR_IN_SANDBOX}/control.sock",
                "selftest": self._selftest_config(bridges) if p.readiness.selftest else None,
                "files": agent.files(ctx),
            }
            # marshal: the shim reads it without importing json (see runner/sandbox/shim.py);
            # the JSON round trip leaves only the plain types marshal format 4 carries.
            shim_bytes = marshal.dumps(json.loads(json.dumps(shim_cfg)), 4)
            if warm is not None:
                sandbox = warm.sandbox
                image_digest = sandbox.image_id
                self.log.emit("sandbox.claimed", "host", container=sandbox.id[:12], image=image,
                              image_digest=image_digest, runtime=engine_runtime(p),
                              pool=warm.pool_id, warm_s=round(time.monotonic() - warm.created, 3))
            else:
                (run_dir / "shim.cfg").write_bytes(shim_bytes)
                spec = container_spec(p, SandboxInputs(
                    image=image, run_id=self.run_id, owner=owner_label(), run_dir=run_dir,
                    etc_dir=etc, workspace=prepared.host_path,
                    workspace_writable=prepared.writable))
                sandbox = engine.create(spec)
                with self._lock:
                    self._sandbox = sandbox
                image_digest = sandbox.image_id
                self.log.emit("sandbox.created", "host", container=sandbox.id[:12], image=image,
                              image_digest=image_digest, runtime=spec.runtime)
            watching = threading.Event()
            if prepared.copy is not None:
                threading.Thread(target=self._watch_copy, args=(prepared, watching),
                                 daemon=True, name="airlock-copy-watch").start()
            try:
                code, oom = self._run_sandbox(sandbox, warm, shim_bytes)
                if not oom and code != 0:
                    oom = self._late_oom(sandbox, code)
            finally:
                watching.set()
            self._copy_full(prepared)
            exit_code, status, reason = self._classify(agent, code, oom)
        except KeyboardInterrupt:
            self._end("interrupted")
            exit_code, status, reason = 130, "interrupted", "interrupted"
        except AirlockError as exc:
            error = exc.one_line()
            exit_code = exc.exit_code
            status = "not_ready" if exc.exit_code == ExitCode.NOT_READY else "error"
            reason = "error"
            self.log.emit("run.error", "host", error=error)
        except Exception as exc:
            error = f"the engine connection failed mid-run: {type(exc).__name__}: {exc}"[:500]
            exit_code, status, reason = ExitCode.NOT_READY, "engine_lost", "engine"
            self.log.emit("run.error", "host", error=error)
        finally:
            self._teardown(control, services)
            if prepared is not None and prepared.copy is not None:
                try:
                    patch_text, left_out = self._patch(prepared)
                finally:
                    ws_mod.unmount(prepared.copy)
            if warm is not None:
                with contextlib.suppress(OSError):
                    warm.feed.close()
                if warm.workspace_dir is not None:  # the pool's mount, even if never filled
                    ws_mod.unmount(warm.workspace_dir)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        if self._end_reason == "disk" and reason in ("command", "agent", "error"):
            # The agent's own ending does not hide that a cap cut its workspace short.
            exit_code, status, reason = ExitCode.BUDGET_EXCEEDED, "budget_exceeded", "disk"

        if self._keep_dir():
            lost = "the run directory was removed during the run: its event log went with it"
            error = f"{error}; {lost}" if error else lost
        result = RunResult(
            run_id=self.run_id,
            run_dir=self.dir,
            status=status,
            exit_code=int(exit_code),
            exit_reason=reason,
            agent=agent.name,
            policy=p.name,
            policy_digest=policy_digest(p),
            image=image,
            duration_s=round(time.monotonic() - t0, 3),
            durations=self._durations(t0),
            budgets=self.budgets.snapshot(),
            refused=self._refused,
            image_digest=image_digest,
            error=error,
            patch=patch_text or None,
            left_out=left_out,
            selftest=self._selftest,
            result=self.result_value,
        )
        self.log.write_suppressed()
        self.log.emit("run.end", "host", status=status, exit_code=int(exit_code),
                      exit_reason=reason, duration_s=result.duration_s,
                      events_dropped=self.log.dropped)
        result.events = self.log.count
        result.last_hash = self.log.last_hash
        self.log.close()
        write_report(result)
        return result

    def _keep_dir(self) -> bool:
        """Make the run's directory again if something removed it mid-run, so that the
        patch and the report still land; True once that has happened."""
        if not self.dir.is_dir():
            self._dir_lost = True
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self._dir_lost

    # -- the workspace copy's caps --------------------------------------------------------

    def _watch_copy(self, ws: ws_mod.PreparedWorkspace, done: threading.Event) -> None:
        """End the run when the agent fills its copy: past the cap it only gets ENOSPC."""
        while not done.wait(COPY_POLL):
            if self._copy_full(ws):
                return

    def _copy_full(self, ws: ws_mod.PreparedWorkspace) -> bool:
        free = ws_mod.usage(ws)
        if free is None or ws.limits is None:
            return False
        space, inodes = free
        if space >= ws_mod.PAGE and inodes > 0:
            return False
        with self._lock:
            if self._disk_noted:
                return True
            self._disk_noted = True
        what = "copy_size" if space < ws_mod.PAGE else "copy_files"
        self.log.emit("disk.exceeded", "host", cap=what,
                      limit=ws.limits.size if what == "copy_size" else ws.limits.files)
        self._end("disk")
        return True

    def _patch(self, ws: ws_mod.PreparedWorkspace) -> tuple[str, dict[str, Any] | None]:
        """Diff the copy within the policy's caps; record what was left out, and why."""
        fs = self.policy.filesystem
        try:
            result = ws_mod.patch(ws, ws_mod.PatchLimits(fs.patch_size, fs.patch_file_size))
        except AirlockError as exc:
            self.log.emit("workspace.patch_failed", "host", error=str(exc))
            return "", None
        except OSError as exc:
            self.log.emit("workspace.patch_failed", "host", error=str(exc)[:300])
            return "", None
        if result.text:
            self._keep_dir()
            path = self.dir / "changes.patch"
            path.write_text(result.text, errors="surrogateescape")
            self.log.emit("workspace.patch", "host", bytes=len(result.text), files=result.files,
                          path=str(path))
        if not result.left_out_count:
            return result.text, None
        left_out = {"count": result.left_out_count, "files": result.left_out}
        self.log.emit("workspace.left_out", "host", count=result.left_out_count,
                      files=result.left_out[:LEFT_OUT_IN_EVENT])
        caps = sorted({str(f["reason"]) for f in result.left_out})
        with self._lock:
            noted, self._disk_noted = self._disk_noted, True
            if self._end_reason is None:
                self._end_reason = "disk"
        if not noted:
            self.log.emit("disk.exceeded", "host", cap="patch", reasons=caps)
        return result.text, left_out

    def _durations(self, t0: float) -> dict[str, float | None]:
        def span(a: float | None, b: float | None) -> float | None:
            return round(b - a, 3) if a is not None and b is not None else None

        end = time.monotonic()
        return {"total": span(t0, end), "start": span(t0, self._agent_started),
                "agent": span(self._agent_started, self._agent_ended)}

    def _teardown(self, control: ControlServer | None, services: ServiceHost) -> None:
        """Remove the sandbox and stop the services; each step runs whatever the others do."""
        self._exited.set()  # a killer still at work (a sandbox never started) stops
        with self._lock:
            sandbox = self._sandbox
        if sandbox is not None and self._abandoned.is_set():
            # The engine refused the removal already: the killer keeps at it, not the run.
            self.log.emit("sandbox.left", "host", container=sandbox.id[:12])
        elif sandbox is not None:
            try:
                sandbox.remove()
                self.log.emit("sandbox.removed", "host")
            except Exception as exc:
                needs_gc()
                self.log.emit("sandbox.remove_failed", "host", error=str(exc)[:300])
        if control is not None:
            control.close()
        if self.mcp_server is not None:
            self.result_value = self.mcp_server.result
        try:
            services.close()
        except Exception as exc:
            self.log.emit("services.close_failed", "host", error=str(exc)[:300])

    def _model(self) -> str | None:
        """The full model id for the agent: a role, alias or id the policy allows."""
        provider = self.policy.provider
        if provider is None:
            return self.o.model
        wanted = self.o.model or "default"
        resolved = provider.resolve_model(wanted)
        if resolved is None:
            if self.o.model is None and not provider.models:
                return None  # no roles configured: the agent's own default applies
            allowed = ", ".join(sorted({*provider.models, *provider.allowed_models()}))
            raise BadInput(f"model {wanted!r} is not allowed by the policy "
                           f"(allowed: {allowed or 'none configured'})")
        return resolved

    def _classify(self, agent: Agent, code: int, oom: bool) -> tuple[int, str, str]:
        reason = self._end_reason
        if reason == "disk":
            return ExitCode.BUDGET_EXCEEDED, "budget_exceeded", "disk"
        if reason == "budget":
            return ExitCode.BUDGET_EXCEEDED, "budget_exceeded", "budget"
        if reason == "host_limit":  # the sandbox kept making the host refuse it
            return ExitCode.BUDGET_EXCEEDED, "budget_exceeded", "host_limit"
        if reason == "timeout":
            return ExitCode.WALL_TIME, "timeout", "wall_time"
        if reason == "log":
            return ExitCode.BUDGET_EXCEEDED, "budget_exceeded", "log_cap"
        if reason is not None and reason.endswith("_abuse"):
            return ExitCode.BUDGET_EXCEEDED, "budget_exceeded", reason
        if reason == "interrupted":
            return 130, "interrupted", "interrupted"
        if reason == "cancelled":
            return 130, "cancelled", "cancelled"
        if oom:
            return ExitCode.KILLED, "oom", "oom"
        if self._selftest is not None and not self._selftest.get("ok") and code == 3:
            return ExitCode.NOT_READY, "not_ready", "selftest"
        if self._agent_exit is None and self._agent_started is None and code != 0:
            # The shim never started the agent: the sandbox itself failed.
            return ExitCode.NOT_READY, "not_ready", "sandbox"
        if agent.passthrough_exit:
            return code, "succeeded" if code == 0 else "failed", "command"
        ok = agent.succeeded(code)
        return (ExitCode.OK if ok else ExitCode.AGENT_FAILED), ("succeeded" if ok else "failed"), "agent"

    def _late_oom(self, sandbox: Sandbox, code: int) -> bool:
        """Whether a gVisor sandbox that ended with a failure was killed for memory after all.

        gVisor's sandbox is one host process (the Sentry) holding all of the run's memory,
        so the kernel's OOM killer ends the whole sandbox, while the agent inside may
        still see an allocation fail and exit by itself. The engine then sometimes
        reports the exit (not OOM-killed) before the OOM event, ~1 run in 20 under load.
        Only such runs wait for it (LATE_OOM_WAIT); on runc the OOM killer ends the
        agent, the shim outlives it, and the engine hears of the kill first.
        """
        if self.policy.process.runtime != "runsc" or self._ended_by_host():
            return False
        oom = sandbox.late_oom(LATE_OOM_WAIT)
        if oom and not self._ended_by_host():
            # sandbox.exited said otherwise: the log says what changed the verdict
            self.log.emit("sandbox.oom_killed", "host", exit_code=code,
                          detail="the engine reported the OOM kill after the exit")
        return oom

    def _ended_by_host(self) -> bool:
        with self._lock:
            return self._end_reason is not None

    def _run_sandbox(self, sandbox: Sandbox, warm: WarmSandbox | None = None,
                     shim_config: bytes = b"") -> tuple[int, bool]:
        deadline = self.policy.resources.wall_time
        timer = threading.Timer(deadline, self._end, args=("timeout",))
        timer.daemon = True
        if self._ended_by_host():  # ended before the sandbox existed: it never starts
            return 137, False
        if warm is not None:
            # Attached before the configuration goes down: every byte the agent writes
            # is collected, as with a cold start's attach-before-start.
            sandbox.attach()
            warm.deliver(shim_config)
        else:
            sandbox.start()
        self.log.emit("sandbox.started", "host")
        with self._lock:
            self._started = True
        if self._ended_by_host():  # ended while it started, before a kill could be sent
            self._kill(sandbox)
        timer.start()
        reader = threading.Thread(target=self._pump_output, args=(sandbox,), daemon=True)
        reader.start()
        try:
            exit_ = self._wait(sandbox)
        finally:
            self._exited.set()
            timer.cancel()
        reader.join(timeout=5)
        self.log.emit("sandbox.exited", "host", code=exit_.code, oom_killed=exit_.oom_killed)
        return exit_.code, exit_.oom_killed

    def _wait(self, sandbox: Sandbox) -> Exit:
        """The engine's report of the sandbox's exit; or, once the killer gave up on a
        sandbox the engine could neither kill nor remove, a kill's exit without it."""
        outcome: list[Exit | BaseException] = []
        reported = threading.Event()

        def wait() -> None:
            try:
                outcome.append(sandbox.wait())
            except BaseException as exc:
                outcome.append(exc)
            finally:
                reported.set()

        threading.Thread(target=wait, name="airlock-wait", daemon=True).start()
        while not reported.wait(0.5):
            if self._abandoned.is_set():
                return Exit(code=137, oom_killed=False)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _pump_output(self, sandbox: Sandbox) -> None:
        partial = {"stdout": b"", "stderr": b""}
        over = False
        try:
            for stream, chunk in sandbox.output():
                # Past the budget the sandbox is being killed; keep draining what is still
                # in flight, unrecorded: an attach stream nobody reads can hold the
                # engine's end of the container open (seen under gVisor: it never exited).
                # An abandoned sandbox's output is drained unread: its run has ended.
                if over or self._abandoned.is_set() \
                        or not self.budgets.charge("output_bytes", len(chunk)):
                    over = True
                    continue
                # Whatever one chunk holds, the pump goes on: if it stopped, steps and
                # output bytes would no longer be counted.
                try:
                    self._take_chunk(stream, chunk, partial)
                except Exception as exc:
                    self.log.refusal("output.error", "host", kind="chunk",
                                     error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            self.log.emit("output.error", "host", error=clip_text(str(exc), 300))

    def _take_chunk(self, stream: str, chunk: bytes, partial: dict[str, bytes]) -> None:
        if self.o.on_output is not None:
            with contextlib.suppress(Exception):  # a broken console must not stop the pump
                self.o.on_output(stream, chunk)
        text = chunk.decode("utf-8", errors="replace")
        self.log.emit("agent.output", "agent", stream=stream,
                      text=text[:OUTPUT_EVENT_CAP], truncated=len(text) > OUTPUT_EVENT_CAP)
        buf = partial[stream] + chunk
        *lines, partial[stream] = buf.split(b"\n")
        for raw in lines:
            try:
                self._parse(self.o.agent, stream, raw.decode("utf-8", errors="replace"))
            except Exception as exc:
                self.log.refusal("output.error", "host", kind="line",
                                 error=f"{type(exc).__name__}: {exc}")
        if len(partial[stream]) > MAX_PARTIAL_LINE:
            partial[stream] = b""

    def _parse(self, agent: Agent, stream: str, line: str) -> None:
        for ev in agent.parse_line(stream, line):
            self.log.emit(ev.type, "agent", **ev.data)
            if ev.step:
                self.budgets.charge("steps", 1)

    # -- inputs for the shim ---------------------------------------------------------

    def _agent_env(self, agent: Agent, ctx: AgentContext) -> dict[str, str]:
        p = self.policy
        env = {"PATH": DEFAULT_PATH, "HOME": SANDBOX_HOME, "LANG": "C.UTF-8", "TMPDIR": "/tmp",
               "AIRLOCK_RUN_ID": self.run_id}
        source = self.o.env_source
        for name in p.env.allow:
            if name in source:
                env[name] = source[name]
        env.update(p.env.set)
        env.update(agent.env(ctx))
        env.update(ctx.endpoints)
        return env

    def _selftest_config(self, bridges: list[dict[str, Any]]) -> dict[str, Any]:
        return {"gate": self.policy.readiness.gate, "runtime": self.policy.process.runtime,
                "host_addresses": self.o.host_addresses,
                "read_only_root": self.policy.filesystem.read_only_root}

    def _start_services(self, services: ServiceHost, run_dir: Path
                        ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Start the run's host services; return the shim's bridges and the agent's env."""
        from runner.run.wiring import start_services

        return start_services(self, services, run_dir)


def run(options: RunOptions) -> RunResult:
    return Run(options).execute()

