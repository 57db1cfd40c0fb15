"""`airlock serve`: a per-user server that makes `airlock run` start fast.

Most of what `airlock run` costs before a sandbox exists is Python importing the
docker SDK, pydantic, typer and the rest, and negotiating with the engine. The server
pays that once: it imports everything, then keeps a pre-forked worker (a "spare")
blocked in accept() on its socket. A client's connection goes to the spare, which
does the whole run as the CLI would in-process, in its own process:

- in the client's working directory, with the client's stdin, stdout and stderr
  (passed as descriptors, so output is written straight to them, never relayed);
- with an environment made only of what the client sent: a fixed set of non-secret
  variables, then the variables this run's policy may read (`env.allow`, the
  provider's key variable), asked for by name. Nothing of the server's own
  environment reaches a run;
- Ctrl-C or SIGTERM on the client arrives as an interrupt message and becomes
  KeyboardInterrupt in the worker's main thread, exactly as an in-process Ctrl-C:
  the run ends `interrupted` with exit 130. A client that disappears (even by
  SIGKILL) closes the connection, which is treated the same way.

The server process itself never talks to the engine and runs no threads, so that
forking it is safe. It replaces each spare as it is taken, reaps workers, and stands
in for the per-process reaper: after a worker that was interrupted, failed to clean
up or died, it runs `gc` in a forked child. Each run's objects are owned by its
worker's pid, so gc can tell live runs from dead ones as usual.

`airlock run` starts a server by itself when none answers (`--auto`: it logs to
`serve.log` beside its socket and exits after 30 idle minutes); that run goes
in-process, the next ones through the server. A server whose code changed on disk
(an upgrade, an edit) hands each client back to its own process and drains: no run
ever executes code older than what is installed.

Security: the socket is 0600 in a 0700 directory of the server's user (see
`paths`), the server answers only peers of its own uid (SO_PEERCRED), and it
never listens on TCP.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import io
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runner.errors import AirlockError
from runner.server import paths
from runner.server import protocol as p

GC_EVERY = 900.0  # seconds between background gc passes
SHUTDOWN_GRACE = 30.0
REFILL_DELAY = 0.5  # seconds after a spare is taken before its replacement is forked
SPARE_READY, SPARE_TAKEN = 0, 1  # what a spare tells the server, with its pid
# A worker's exit status: 3 asks the server for gc, 4 says the code on disk changed.
EXIT_CLEAN, EXIT_GC, EXIT_STALE = 0, 3, 4
AUTO_IDLE_EXIT = 1800.0  # a server that `airlock run` started ends after this idle time
CHECK_CODE_EVERY = 5.0  # seconds between the idle server's own looks at the code on disk


def _log(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"airlock serve[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()


def code_fingerprint() -> tuple[tuple[str, int, int], ...]:
    """The installed Airlock code as it is on disk now: each module's path, mtime and
    size, and the installed distributions beside its dependencies (an upgrade renames
    their dist-info). A few hundred microseconds; an upgrade or an edit changes it."""
    import runner

    out: list[tuple[str, int, int]] = []
    import docker
    import httpcore

    sites = {os.path.dirname(os.path.dirname(os.path.abspath(dep.__file__ or "")))
             for dep in (docker, httpcore)}
    for site in sorted(sites):  # one listing each
        with contextlib.suppress(OSError):
            out.extend((name, 0, 0) for name in sorted(os.listdir(site))
                       if name.endswith(".dist-info"))
    for root in runner.__path__:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        st = os.stat(path)
                        out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(out)


# -- what the worker does -------------------------------------------------------------


class Worker:
    """One connection, one run, in a process forked from the warm server."""

    def __init__(self, conn: socket.socket, command: Any,
                 fingerprint: tuple[tuple[str, int, int], ...] | None = None) -> None:
        self.conn = conn
        self.command = command  # the click command of the whole CLI
        self.fingerprint = fingerprint  # of the code this server loaded
        self.reader = p.Reader(conn)
        self.interrupted = threading.Event()
        self.done = threading.Event()

    def handle(self) -> int:
        conn = self.conn
        pid, uid = paths.peer(conn)
        if uid != os.geteuid():
            _log(f"refused a connection from uid {uid} (pid {pid})")
            return EXIT_CLEAN  # another user: not a word
        conn.settimeout(30)
        frame = self.reader.frame()
        fds, self.reader.fds = self.reader.fds, []
        try:
            if frame is None or frame[0] != p.HELLO:
                return EXIT_CLEAN
            hello = p.loads(frame[1]) or {}
            if hello.get("v") != p.VERSION or len(fds) != 3:
                p.send(conn, p.FALLBACK, {"reason": "protocol version"})
                return EXIT_CLEAN
            if hello.get("runner") not in (None, p.INSTALLATION):
                p.send(conn, p.FALLBACK, {"reason": "another installation of Airlock"})
                return EXIT_CLEAN
            if self.fingerprint is not None and code_fingerprint() != self.fingerprint:
                _log("the code on disk changed; this run goes in-process; draining")
                p.send(conn, p.FALLBACK, {"reason": "code changed"})
                return EXIT_STALE
            args = [str(a) for a in hello.get("argv") or []]
            prog = str(hello.get("prog") or "airlock")
            try:
                os.chdir(str(hello["cwd"]))
            except (OSError, KeyError, TypeError):
                p.send(conn, p.FALLBACK, {"reason": "working directory"})
                return EXIT_CLEAN
            base = {str(k): str(v) for k, v in (hello.get("env") or {}).items()}
            os.environ.clear()
            os.environ.update(base)
            reason, names = plan(self.command, args)
            if reason is not None:
                p.send(conn, p.FALLBACK, {"reason": reason})
                return EXIT_CLEAN
            p.send(conn, p.NEED, names)
            frame = self.reader.frame()
            if frame is None or frame[0] != p.ENV:
                return EXIT_CLEAN  # the client went away or was interrupted first
            wanted = set(names)
            given = p.loads(frame[1]) or {}
            os.environ.update({k: str(v) for k, v in given.items() if k in wanted})
            os.environ["AIRLOCK_NO_REAPER"] = "1"  # the server reaps for its workers
            _log(f"run for client pid {pid}: in {os.getcwd()}")  # not its arguments: prompts
            conn.settimeout(None)
            _adopt_stdio(fds)
            fds = []
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        p.send(conn, p.START)
        threading.Thread(target=self._watch, name="airlock-serve-watch", daemon=True).start()
        code: int | None = None
        try:
            try:
                code = self._invoke(args, prog)
            finally:
                # From here on a late interrupt (the client leaving) must not cut the
                # worker short: the run and its report are complete.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                self.done.set()
        except KeyboardInterrupt:
            pass
        code = 130 if code is None else code
        _release_stdio()
        with contextlib.suppress(OSError):
            p.send(conn, p.EXIT, {"code": code})
        from runner.run import reaper

        return EXIT_GC if (self.interrupted.is_set() or reaper._needs_gc) else EXIT_CLEAN

    def _watch(self) -> None:
        """Interrupt and end-of-connection from the client become a Ctrl-C here."""
        main = threading.main_thread().ident
        while True:
            try:
                frame = self.reader.frame()
            except (OSError, p.ProtocolError):
                frame = None
            if (frame is None or frame[0] == p.INTERRUPT) and not self.interrupted.is_set() \
                    and not self.done.is_set():
                self.interrupted.set()
                assert main is not None
                signal.pthread_kill(main, signal.SIGINT)
            if frame is None:
                return

    def _invoke(self, args: list[str], prog: str) -> int:
        try:
            from runner.usage import invoke

            return invoke(lambda: self.command.main(args=["run", *args], prog_name=prog,
                                                    standalone_mode=False))
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return int(exc.code or 0)
            with contextlib.suppress(Exception):
                sys.stderr.write(f"{exc.code}\n")
            return 1
        except KeyboardInterrupt:
            return 130
        except Exception:
            # What the in-process CLI does with a bug: the traceback on the client's
            # stderr and exit 1, not a worker that dies and a client told exit 3.
            import traceback

            traceback.print_exc()
            return 1
        return 0


def plan(command: Any, args: list[str]) -> tuple[str | None, list[str]]:
    """(why the client should run this itself, or None; the variables the run reads).

    Errors in the arguments or the policy are not decided here: the run reports them
    exactly as the in-process CLI would, so whatever cannot be parsed asks for nothing.
    """
    try:
        run_cmd = command.commands["run"]
        ctx = run_cmd.make_context("run", list(args), resilient_parsing=True)
        params = ctx.params
    except Exception:  # reported by the run itself
        return None, []
    if params.get("mcp_tool"):
        # module:function is imported in the host process, from the client's sys.path.
        return "--mcp-tool runs in the client's process", []
    try:
        from runner.policy.loader import load_policy
        from runner.run.launch import apply_overrides

        policy = apply_overrides(
            load_policy(params.get("policy") or "default").policy,
            provider=params.get("provider"), runtime=params.get("runtime"),
            mcp_tools=[], mcp_servers=list(params.get("mcp_server") or []),
            enable_tools=list(params.get("enable_tool") or []))
    except Exception:  # reported by the run itself
        return None, []
    if policy.mcp.tools:
        return "the policy's Python MCP tools run in the client's process", []
    return None, sorted(run_env_names(policy))


def run_env_names(policy: Any) -> set[str]:
    """The variables of the host's environment a run under `policy` may read."""
    names = set(policy.env.allow)
    provider = policy.provider
    if provider is not None:
        from runner.gateway.backends import BACKENDS

        spec = BACKENDS.get(provider.backend)
        key = provider.api_key_env or (spec.default_key_env if spec is not None else None)
        if key:
            names.add(key)
        if provider.backend == "vertex":  # application default credentials
            names |= {"GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG",
                      "GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"}
    return names


def _adopt_stdio(fds: list[int]) -> None:
    """Make the client's stdin, stdout and stderr this process's own."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    encoding = getattr(sys.__stdout__, "encoding", None) or "utf-8"
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                 encoding=encoding)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                  encoding=encoding, line_buffering=os.isatty(1))
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                  encoding=encoding, errors="backslashreplace",
                                  line_buffering=True)


def _release_stdio() -> None:
    """Flush and let go of the client's descriptors (the client's caller sees EOF)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, target)
    os.close(devnull)


# -- the server -----------------------------------------------------------------------


# Imported by the server so that no run pays for them: the engine, the orchestrator,
# the console, and the services agent runs start (gateway, proxy, MCP).
PRELOAD = ("docker", "runner.engines.docker_engine", "runner.run.launch", "runner.run.wiring",
           "runner.events.console", "runner.gateway", "runner.gateway.proxy", "runner.mcp",
           "rich.live")


def preload() -> Any:
    """Import and warm what runs use; return the CLI's click command."""
    import importlib

    import typer.main

    import runner.cli as cli
    from runner._lazy_typer import real

    cli.tidy_help()
    command = typer.main.get_command(real(cli.app))
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a run that needs it reports the problem itself
            _log(f"not preloaded: {name}: {exc}")
    with contextlib.suppress(Exception):  # fills the policy compiler's caches
        from runner.policy.compile import SandboxInputs, container_spec
        from runner.policy.loader import load_policy

        policy = load_policy("default").policy
        for runtime in ("runc", "runsc"):
            data = policy.model_dump(mode="json")
            data["process"]["runtime"] = runtime
            container_spec(type(policy).model_validate(data),
                           SandboxInputs(image="x", run_id="x", owner="x"))
    return command


class Server:
    def __init__(self, path: Path, *, spares: int = 1, idle_exit: float | None = None,
                 auto: bool = False) -> None:
        self.path = path
        self.auto = auto
        self.draining = False
        self.fingerprint: tuple[tuple[str, int, int], ...] = ()
        self._path_id: tuple[int, int] = (0, 0)
        self._lock_fd: int | None = None
        self.pid_path = path.with_suffix(".pid")
        self.spares = max(1, spares)
        self.idle_exit = idle_exit
        self.idle: set[int] = set()
        self.busy: set[int] = set()
        self.gc_pids: set[int] = set()
        self.stopping = False
        self.last_active = time.monotonic()
        self.spare_failures = 0
        self.command: Any = None
        self.listener: socket.socket | None = None
        self.keeper_pid: int | None = None  # the warm pool's process (see keeper.py)
        self.keeper_starts = 0

    # setup ---------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        try:
            paths.make_dir(self.path.parent)
        except paths.InsecurePath as exc:
            raise AirlockError(f"cannot serve: {exc}",
                               hint="use a directory only you can reach (mode 0700)") from None
        # The socket's name belongs to whoever holds this lock, for as long as it serves:
        # two servers starting at once cannot both take it, and one that drains or
        # ends never removes a successor's socket.
        lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                       0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise AirlockError(f"a server already listens at {self.path}") from None
        self._lock_fd = lock
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a socket left by a server that is gone: we hold the name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is 0600 from its first instant
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        paths.check_socket(self.path)
        self._path_id = _file_id(self.path)
        sock.listen(128)
        return sock

    def serve(self) -> int:
        from runner.run.services import raise_nofile_limit

        raise_nofile_limit()  # the runs it serves hold their services' descriptors here
        try:
            self.listener = self._bind()
        except AirlockError:
            if self.auto:  # another client started one first: nothing to do
                return 0
            raise
        if self.auto:
            _log_to(self.path.parent / "serve.log")
        self.pid_path.write_text(f"{os.getpid()}\n")
        try:
            self.fingerprint = code_fingerprint()
            self.command = preload()
            if threading.active_count() != 1:
                _log("warning: threads were started while preloading; forking may be unsafe")
            gc.collect()
            gc.freeze()  # fewer copy-on-write pages in each worker
            self._start_keeper()
            return self._loop()
        finally:
            self._close()

    def _close(self) -> None:
        """Give up the socket's name (once): remove the socket and pid file, release the
        lock. The listener itself stays open in the spares until they leave."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError, ValueError):
            if int(self.pid_path.read_text().strip()) == os.getpid():
                self.pid_path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # the loop ------------------------------------------------------------------------

    def _loop(self) -> int:
        notify_r, notify_w = os.pipe()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)

        def on_stop(signum: int, frame: Any) -> None:
            self.stopping = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGCHLD, lambda s, f: None)  # only to wake the loop
        closing = (notify_r, wake_r, wake_w)
        _log(f"listening on {self.path}")
        self._spawn_gc()
        next_gc = time.monotonic() + GC_EVERY
        next_check = time.monotonic() + CHECK_CODE_EVERY
        listener = self.listener
        assert listener is not None
        ready_spares: set[int] = set()  # idle spares blocked in accept(), warmed up
        refill_at = 0.0
        try:
            while not self.stopping:
                if self.spare_failures >= 5:
                    _log("workers keep failing to start; exiting (runs go in-process)")
                    return 1
                now = time.monotonic()
                # A taken spare is replaced a little later, not while its run starts on
                # a machine that may have two cores; at once when a client is waiting.
                while (not self.draining and len(self.idle) < self.spares
                       and now >= refill_at):
                    self._spawn_spare(notify_w, closing, prewarm=True)
                watch = [notify_r, wake_r]
                if not self.draining and not ready_spares & self.idle:
                    watch.append(listener.fileno())  # to notice clients left waiting
                timeout = 5.0 if len(self.idle) >= self.spares else max(0.0, refill_at - now)
                if self.draining:
                    timeout = 0.5
                try:
                    ready, _, _ = select.select(watch, [], [], timeout)
                except InterruptedError:
                    ready = []
                if notify_r in ready:
                    data = os.read(notify_r, 4096)
                    for pid, state in struct.iter_unpack("ii", data[: len(data) // 8 * 8]):
                        if state == SPARE_READY:
                            ready_spares.add(pid)
                            continue
                        ready_spares.discard(pid)
                        self.idle.discard(pid)
                        self.busy.add(pid)
                        self.last_active = time.monotonic()
                        refill_at = self.last_active + REFILL_DELAY
                if listener.fileno() in ready and not self.draining \
                        and not ready_spares & self.idle and _pending(listener):
                    # Clients are queued and no spare is ready: one that takes a client
                    # without warming up first.
                    self._spawn_spare(notify_w, closing, prewarm=False)
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                self._reap()
                ready_spares &= self.idle
                now = time.monotonic()
                if now >= next_gc:
                    self._spawn_gc()
                    next_gc = now + GC_EVERY
                if (self.idle_exit is not None and not self.busy
                        and now - self.last_active > self.idle_exit):
                    _log("idle; exiting")
                    break
                # Not on every turn: turns come with each run's start, and every worker
                # checks for itself before it takes a run anyway.
                if not self.draining and now >= next_check:
                    next_check = now + CHECK_CODE_EVERY
                    if code_fingerprint() != self.fingerprint:
                        _log("the code on disk changed; draining")
                        self._drain()
                if self.draining and not self.busy and not self.idle:
                    _log("drained; exiting")
                    break
        finally:
            self._shutdown()
            signal.set_wakeup_fd(-1)
            for fd in (notify_r, notify_w, wake_r, wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        return 0

    def _spawn_spare(self, notify_w: int, closing: tuple[int, ...], *, prewarm: bool) -> None:
        assert self.listener is not None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            code = 70
            try:
                signal.set_wakeup_fd(-1)
                for fd in closing:
                    os.close(fd)
                if self._lock_fd is not None:
                    os.close(self._lock_fd)  # the lock is the server's alone
                code = _spare(self.listener, notify_w, self.command, prewarm,
                              self.fingerprint, (str(self.path), self._path_id))
            except BaseException:  # a worker must never return into the server
                with contextlib.suppress(Exception):
                    import traceback

                    traceback.print_exc()
            finally:
                os._exit(code)
        self.idle.add(pid)

    def _start_keeper(self) -> None:
        """Fork the pool's keeper and point the workers (forked later) at it."""
        from runner.run import launch
        from runner.server import keeper

        if not keeper.pools_enabled() or self.keeper_starts >= 5:
            return
        self.keeper_starts += 1
        closing = tuple(fd for fd in (self._lock_fd,
                                      self.listener.fileno() if self.listener else None)
                        if fd is not None)
        self.keeper_pid = keeper.start_keeper(self.path, closing)
        launch.POOL = keeper.RemotePool(keeper.keeper_path(self.path))

    def _stop_keeper(self) -> None:
        pid, self.keeper_pid = self.keeper_pid, None
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    time.sleep(0.05)
                    continue
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _spawn_gc(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                if self.listener is not None:
                    self.listener.close()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                from runner.engines.docker_engine import DockerEngine
                from runner.run.gc import collect

                collect(DockerEngine())
                code = 0
            except BaseException:  # the engine may be away; next time
                pass
            finally:
                os._exit(code)
        self.gc_pids.add(pid)

    def _reap(self) -> None:
        want_gc = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            if pid == self.keeper_pid:
                self.keeper_pid = None
                if not self.stopping and not self.draining:
                    _log(f"the pool's keeper ended (status {code}); starting another")
                    self._start_keeper()
            elif pid in self.gc_pids:
                self.gc_pids.discard(pid)
            elif pid in self.idle:
                self.idle.discard(pid)
                if not self.stopping and not self.draining:
                    self.spare_failures += 1
                    _log(f"a spare worker ended before taking a run (status {code})")
            elif pid in self.busy:
                self.busy.discard(pid)
                self.last_active = time.monotonic()
                self.spare_failures = 0
                if code == EXIT_STALE:
                    self._drain()
                elif code != EXIT_CLEAN:
                    want_gc = True
                    if code != EXIT_GC:
                        _log(f"worker {pid} ended abnormally (status {code}); collecting")
        if want_gc and not self.stopping:
            self._spawn_gc()

    def _drain(self) -> None:
        """Take no more runs (the socket goes, so the next client starts a new server
        or runs in-process); let the ones under way finish."""
        if self.draining:
            return
        self.draining = True
        self._stop_keeper()
        # No spare is killed: one may have just taken a client. With the socket's name
        # gone no new client can reach them; each notices within seconds and leaves.
        self._close()

    def _shutdown(self) -> None:
        """Stop taking runs; interrupt the ones under way and wait for them to end."""
        self._close()  # new clients run in their own process from now on
        self._stop_keeper()  # its unclaimed sandboxes go; claimed ones are their runs'
        for pid in self.idle:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.busy:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while (self.busy or self.idle or self.gc_pids) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self.busy:
            _log(f"{len(self.busy)} run(s) still ending; leaving them to finish")
        _log("stopped")


def _file_id(path: str | Path) -> tuple[int, int]:
    """(device, inode) of `path`, or (0, 0) when it is not there."""
    try:
        st = os.lstat(path)
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


def _pending(listener: socket.socket) -> bool:
    """Whether a connection waits in the listen queue (no spare has taken it yet)."""
    ready, _, _ = select.select([listener], [], [], 0)
    return bool(ready)


def _spare(listener: socket.socket, notify_w: int, command: Any, prewarm: bool,
           fingerprint: tuple[tuple[str, int, int], ...] | None = None,
           name: tuple[str, tuple[int, int]] | None = None) -> int:
    """A pre-forked worker: wait for one connection, take it, run it, exit."""
    signal.set_wakeup_fd(-1)
    os.setsid()  # the server's terminal's Ctrl-C is not the client's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    for sig in (signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    if prewarm:
        with contextlib.suppress(Exception):
            _prewarm(command)
    os.write(notify_w, struct.pack("ii", os.getpid(), SPARE_READY))
    server = os.getppid()
    while True:
        try:
            # Wake now and then: a spare whose server is gone leaves (best effort).
            ready, _, _ = select.select([listener], [], [], 1.0)
            if not ready:
                # A spare whose server is gone, or whose socket no longer has its name
                # (the server drains), leaves.
                if os.getppid() != server or (name is not None and
                                               _file_id(name[0]) != name[1]):
                    return EXIT_CLEAN
                continue
            conn, _ = listener.accept()
            break
        except InterruptedError:
            continue
    os.write(notify_w, struct.pack("ii", os.getpid(), SPARE_TAKEN))
    os.close(notify_w)
    listener.close()
    from runner.run import launch

    launch.GC_BEFORE_RUN = False  # the server collects, not each run
    with conn:
        return Worker(conn, command, fingerprint).handle()


def _prewarm(command: Any) -> None:
    """Walk a run's code path while idle, so the run itself does not pay for it.

    A forked worker shares the server's memory until it writes to it; the first touch
    of each page (reference counts, caches) copies it. Doing that here, before a client
    is waiting, halves the page faults and cuts the worker's CPU time on its run. It
    also opens and pings the engine connection the run will use.
    """
    from runner.agents import get_agent
    from runner.engines.docker_engine import _client
    from runner.events.console import Console
    from runner.events.log import EventLog
    from runner.policy.compile import SandboxInputs, container_spec
    from runner.policy.loader import load_policy
    from runner.run.hostaddrs import host_addresses

    _client(shared=True)
    plan(command, ["--", "true"])
    policy = load_policy("default").policy
    container_spec(policy, SandboxInputs(image="x", run_id="x", owner="x"))
    get_agent("command")
    host_addresses()
    Console(quiet=True, live=False)
    log = EventLog(None, "prewarm")
    log.emit("prewarm", "host", data={"x": [1, "y"]})
    log.close()


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(path: Path | None = None, *, spares: int = 1, idle_exit: float | None = None,
          auto: bool = False) -> int:
    if auto and idle_exit is None:
        idle_exit = AUTO_IDLE_EXIT
    return Server(Path(path or paths.default_socket()), spares=spares, idle_exit=idle_exit,
                  auto=auto).serve()


def _log_to(path: Path) -> None:
    """Send this process's log (stderr) to `path`, 0600, appended."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def stop(path: Path | None = None, timeout: float = SHUTDOWN_GRACE + 5) -> bool:
    """Ask the server at `path` to stop; True once it has (False: none was running)."""
    path = Path(path or paths.default_socket())
    pid_path = path.with_suffix(".pid")
    try:
        paths.check_dir(path.parent)
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError, paths.InsecurePath):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
