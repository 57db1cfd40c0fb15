"""Warm pools: started, never-used sandboxes, kept per boundary, each used by one run.

A pooled sandbox is created from a run's boundary (the compiled `ContainerSpec`: image,
runtime, resources, seccomp profile, tmpfs layout, mounts) with nothing of any run in
it: its run directory holds one socket, `pool.sock`, and the shim, started with
`--pool`, says "warm" on it and blocks. A run whose boundary has the same key claims
it: the run's own services bind their sockets in that directory (a socket created
after the start is reachable from inside on runc and under runsc with
`--host-uds=open`), and the run's configuration (argv, environment, files, self-test)
goes down the pool connection. From then on the run is an ordinary run; the sandbox
is removed at its end like any other, and the pool warms a new one in its place.

The pool connection is also the warm sandbox's dead-man switch: when the process
holding the pool ends, the shims of its unclaimed sandboxes exit, and `airlock gc`
removes them (their owner label names that process).

A workspace arrives at the claim as files placed in a directory the pool mounted at
/workspace when it created the sandbox (under gVisor a bind mount made after the start
is not seen inside): a copy on a size-capped tmpfs the pool mounted (copy mode), or a
snapshot that the sandbox sees read-only (ro mode, up to a size; larger ones start
cold, where the bind costs nothing). A `rw` workspace is the host's own directory and
always starts cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from runner.engines import Engine, Sandbox
from runner.engines.base import LABEL_SCRATCH, ContainerSpec
from runner.errors import AirlockError
from runner.policy.compile import SandboxInputs, container_spec
from runner.policy.models import Policy
from runner.run import workspace as ws_mod
from runner.run.gc import OWNER_FILE, SCRATCH_PREFIX
from runner.run.owner import owner_label

LABEL_POOL = "airlock.pool"  # the pool key's first 16 hex digits
POOL_SOCKET = "pool.sock"
WARM_TIMEOUT = 60.0  # seconds for a new sandbox's shim to say "warm"
PLACEHOLDER = Path("/nonexistent/airlock-pool")


@dataclass(frozen=True)
class Recipe:
    """What a pooled sandbox is made from: a run's boundary, minus the run.

    `workspace`: "none", or how a workspace arrives at the claim into a directory
    mounted at /workspace when the sandbox was created: "ro" (a snapshot, read-only
    inside) or "copy" (a size-capped tmpfs the pool mounted, writable inside).
    """

    policy: Policy
    image: str
    workspace: str = "none"

    def spec(self, inputs: SandboxInputs) -> ContainerSpec:
        return container_spec(self.policy, replace(
            inputs, image=self.image,
            workspace=inputs.workspace if self.workspace != "none" else None,
            workspace_writable=self.workspace == "copy"))

    @property
    def key(self) -> str:
        spec = self.spec(SandboxInputs(image=self.image, run_id="", owner="",
                                       run_dir=PLACEHOLDER, etc_dir=PLACEHOLDER,
                                       workspace=PLACEHOLDER))
        fs = self.policy.filesystem
        # The copy's tmpfs is sized when the pool mounts it: its caps are the boundary too.
        extra = (fs.copy_size, fs.copy_files) if self.workspace == "copy" else ()
        return pool_key(spec, extra)


def pool_key(spec: ContainerSpec, extra: tuple[Any, ...] = ()) -> str:
    """The boundary a sandbox was created with: every setting of its spec but those
    that name a run (its id and owner labels) or a host path."""
    data: dict[str, Any] = asdict(spec)
    data["extra"] = list(extra)
    data["labels"] = {k: v for k, v in spec.labels.items()
                      if k not in ("airlock.run", "airlock.owner", LABEL_POOL, LABEL_SCRATCH)}
    data["mounts"] = [(m.target, m.read_only) for m in spec.mounts]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class WarmSandbox:
    """One started sandbox whose shim waits for a run."""

    key: str
    pool_id: str
    sandbox: Sandbox
    scratch: Path
    run_dir: Path
    etc_dir: Path
    feed: socket.socket
    created: float = field(default_factory=time.monotonic)
    workspace_dir: Path | None = None  # mounted at /workspace, empty until the claim

    def alive(self) -> bool:
        """The shim still holds its end: nothing to read, no EOF."""
        try:
            self.feed.setblocking(False)
            try:
                return self.feed.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                return True
            finally:
                self.feed.setblocking(True)
        except OSError:
            return False

    def deliver(self, config: bytes) -> None:
        """Hand the run's configuration to the shim: from here on the run owns it."""
        try:
            self.feed.sendall(len(config).to_bytes(4, "big") + config)
        finally:
            with contextlib.suppress(OSError):
                self.feed.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.feed.close()
        with contextlib.suppress(Exception):
            self.sandbox.remove()
        if self.workspace_dir is not None:
            ws_mod.unmount(self.workspace_dir)  # a no-op unless the pool mounted a copy
        shutil.rmtree(self.scratch, ignore_errors=True)


def make_scratch() -> tuple[Path, Path, Path]:
    """A private scratch directory with the sandbox's run directory and /etc files."""
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))  # 0700: only this user
    (scratch / OWNER_FILE).write_text(owner_label())
    run_dir = scratch / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(run_dir, 0o755)
    etc = scratch / "etc"
    etc.mkdir()
    (etc / "resolv.conf").write_text("# airlock: the sandbox has no DNS\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost airlock\n::1\tlocalhost\n")
    return scratch, run_dir, etc


def warm_one(engine: Engine, recipe: Recipe, *, timeout: float = WARM_TIMEOUT) -> WarmSandbox:
    """Create and start one pooled sandbox and wait for its shim to say it is warm."""
    from runner.policy.compile import SHIM_COMMAND

    key = recipe.key
    pool_id = "pool-" + secrets.token_hex(6)
    scratch, run_dir, etc = make_scratch()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sandbox: Sandbox | None = None
    workspace: Path | None = None
    try:
        if recipe.workspace != "none":
            workspace = scratch / "workspace"
            workspace.mkdir(mode=0o700)
            if recipe.workspace == "copy":
                uid, _, gid = recipe.policy.process.user.partition(":")
                fs = recipe.policy.filesystem
                ws_mod.mount_tmpfs(workspace, ws_mod.CopyLimits(fs.copy_size, fs.copy_files),
                                   int(uid), int(gid or uid), 0o700)
        listener.bind(str(run_dir / POOL_SOCKET))
        os.chmod(run_dir / POOL_SOCKET, 0o666)  # the sandbox uid connects
        listener.listen(1)
        listener.settimeout(timeout)
        spec = recipe.spec(SandboxInputs(image=recipe.image, run_id=pool_id,
                                         owner=owner_label(), run_dir=run_dir, etc_dir=etc,
                                         workspace=workspace,
                                         extra_labels={LABEL_POOL: key[:16],
                                                       LABEL_SCRATCH: str(scratch)}))
        spec.command = [*SHIM_COMMAND, "--pool"]
        sandbox = engine.create(spec)
        sandbox.start(attach=False)
        conn, _ = listener.accept()
        conn.settimeout(timeout)
        hello = b""
        while not hello.endswith(b"\n") and len(hello) < 64:
            chunk = conn.recv(64)
            if not chunk:
                break
            hello += chunk
        if b'"warm"' not in hello:
            conn.close()
            raise AirlockError(f"a pooled sandbox did not get warm (said {hello[:64]!r})")
        conn.settimeout(None)
        return WarmSandbox(key, pool_id, sandbox, scratch, run_dir, etc, conn,
                           workspace_dir=workspace)
    except BaseException:
        if sandbox is not None:
            with contextlib.suppress(Exception):
                sandbox.remove()
        if workspace is not None:
            ws_mod.unmount(workspace)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    finally:
        # One connection, the shim's: nothing else may ever reach this socket.
        listener.close()
        with contextlib.suppress(OSError):
            (run_dir / POOL_SOCKET).unlink()


class SandboxSource(Protocol):
    """Where a run gets a warm sandbox: a `Pool`, or the per-user server's keeper."""

    def claim(self, recipe: Recipe) -> WarmSandbox | None: ...


@dataclass
class _Entry:
    recipe: Recipe
    ready: deque[WarmSandbox] = field(default_factory=deque)
    warming: int = 0
    fixed: int | None = None  # a configured size; None: learned from demand
    claims: deque[float] = field(default_factory=deque)  # recent claim times
    last_used: float = field(default_factory=time.monotonic)
    failures: int = 0


@dataclass(frozen=True)
class PoolStats:
    keys: int
    ready: int
    warming: int
    claimed: int
    missed: int
    memory_bound: int  # bytes: the sum of the ready sandboxes' memory limits


class Pool:
    """Warm sandboxes per boundary, refilled in the background, bounded in number.

    Sizing per key: a fixed size (`add`), or learned: the claims seen in the last
    `window` seconds, at least one once the key has been asked for, at most
    `max_per_key` (0: nothing is learned, only added keys are kept); a learned key
    unused for `idle` seconds is emptied and then forgotten, and at most `max_keys`
    learned keys are remembered (callers of a shared pool choose the boundaries, and
    each one remembered is the host's memory). Across keys at most `max_total`
    sandboxes are held (ready or warming): that bounds the memory the pool holds,
    reported by `stats()` as the sum of their memory limits.
    """

    def __init__(self, engine: Engine, *, max_total: int = 8, max_per_key: int = 4,
                 window: float = 60.0, idle: float = 900.0, max_keys: int = 64,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.max_keys = max_keys
        self.window = window
        self.idle = idle
        self._on_error = on_error
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._claimed = 0
        self._missed = 0
        self._retire: list[WarmSandbox] = []  # over their key's target, to be removed
        self._thread = threading.Thread(target=self._refill, name="airlock-pool", daemon=True)
        self._thread.start()

    # -- the runs' side ---------------------------------------------------------------

    def add(self, recipe: Recipe, size: int) -> str:
        """Keep `size` sandboxes of this boundary ready (a configured pool)."""
        key = recipe.key
        with self._cond:
            entry = self._entries.setdefault(key, _Entry(recipe))
            entry.fixed = max(0, min(size, self.max_total))
            self._cond.notify_all()
        return key

    def claim(self, recipe: Recipe) -> WarmSandbox | None:
        """A warm sandbox for this boundary, or None (the run starts cold); either way
        the demand is noted and the pool refills."""
        key = recipe.key
        now = time.monotonic()
        stale: list[WarmSandbox] = []
        got: WarmSandbox | None = None
        with self._cond:
            if self._closed:
                return None
            entry = self._entries.get(key) or self._learn(key, recipe, now)
            if entry is None:
                self._missed += 1
                return None
            entry.claims.append(now)
            entry.last_used = now
            while entry.ready:
                candidate = entry.ready.popleft()
                if candidate.alive():
                    got = candidate
                    break
                stale.append(candidate)
            if got is None:
                self._missed += 1
            else:
                self._claimed += 1
            self._cond.notify_all()
        for s in stale:
            s.discard()
        return got

    def _learn(self, key: str, recipe: Recipe, now: float) -> _Entry | None:
        """A new learned key (the caller holds the lock), if one may be remembered."""
        if self.max_per_key <= 0:
            return None
        learned = [(k, e) for k, e in self._entries.items() if e.fixed is None]
        if len(learned) >= self.max_keys:
            # Forget the least recently claimed key that holds nothing; if every one
            # holds a sandbox, this boundary is not learned (it starts cold).
            empty = [(e.last_used, k) for k, e in learned if not e.ready and not e.warming]
            if not empty:
                return None
            del self._entries[min(empty)[1]]
        entry = _Entry(recipe, claims=deque(maxlen=self.max_per_key))
        entry.last_used = now
        self._entries[key] = entry
        return entry

    def stats(self) -> PoolStats:
        with self._cond:
            ready = sum(len(e.ready) for e in self._entries.values())
            memory = sum(len(e.ready) * e.recipe.policy.resources.memory
                         for e in self._entries.values())
            return PoolStats(keys=len(self._entries), ready=ready,
                             warming=sum(e.warming for e in self._entries.values()),
                             claimed=self._claimed, missed=self._missed, memory_bound=memory)

    def close(self) -> None:
        """Remove every unclaimed sandbox; claimed ones belong to their runs."""
        with self._cond:
            self._closed = True
            held = [s for e in self._entries.values() for s in e.ready]
            for e in self._entries.values():
                e.ready.clear()
            self._cond.notify_all()
        for s in held:
            s.discard()
        self._thread.join(timeout=WARM_TIMEOUT + 5)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the background ----------------------------------------------------------------

    def _target(self, entry: _Entry, now: float) -> int:
        if entry.fixed is not None:
            return entry.fixed
        while entry.claims and now - entry.claims[0] > self.window:
            entry.claims.popleft()
        if now - entry.last_used > self.idle:
            return 0
        return max(1, min(len(entry.claims), self.max_per_key))

    def _next(self) -> _Entry | None:
        """The key furthest below its target, if the total allows one more."""
        now = time.monotonic()
        held = sum(len(e.ready) + e.warming for e in self._entries.values())
        best: tuple[int, _Entry] | None = None
        for key, entry in list(self._entries.items()):
            target = self._target(entry, now)
            while len(entry.ready) > target:  # demand fell: give back what is not needed
                self._retire.append(entry.ready.pop())
            if entry.fixed is None and target == 0 and not entry.warming:
                del self._entries[key]  # idle: forgotten, so unused keys cost nothing
                continue
            if entry.failures >= 3:
                continue  # a boundary that cannot get warm is not retried in a loop
            gap = target - len(entry.ready) - entry.warming
            if gap > 0 and held < self.max_total and (best is None or gap > best[0]):
                best = (gap, entry)
        return best[1] if best else None

    def _refill(self) -> None:
        while True:
            with self._cond:
                entry = None
                while not self._closed:
                    entry = self._next()
                    if entry is not None or self._retire:
                        break
                    self._cond.wait(timeout=5.0)
                if self._closed:
                    return
                retire, self._retire = self._retire, []
                if entry is not None:
                    entry.warming += 1
            for s in retire:
                s.discard()
            if entry is None:
                continue
            try:
                warm = warm_one(self.engine, entry.recipe)
            except Exception as exc:
                with self._cond:
                    entry.warming -= 1
                    entry.failures += 1
                if self._on_error is not None:
                    self._on_error(f"pool: could not warm a sandbox: {exc}"[:300])
                time.sleep(1.0)
                continue
            with self._cond:
                entry.warming -= 1
                entry.failures = 0
                if self._closed:
                    warm.discard()
                    return
                entry.ready.append(warm)
                self._cond.notify_all()

    def wait_ready(self, recipe: Recipe, count: int = 1, timeout: float = 120.0) -> bool:
        """Block until `count` sandboxes of this boundary are ready (tests, benchmarks)."""
        key = recipe.key
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                entry = self._entries.get(key)
                if entry is not None and len(entry.ready) >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(timeout=left)


def describe(pool: Pool) -> dict[str, Any]:
    return asdict(pool.stats())
