"""`airlock serve`: runs handed to the warm server behave as in-process runs, and only
the server's own user can reach it.

Each test starts its own server on a private socket (AIRLOCK_SERVE_SOCKET) and talks to
it with the real CLI (`python -m runner.cli run ...`); the server log says which runs it
took, so a test can tell a served run from one the client ran itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import AIRLOCK, ROOT, wait_for, write_policy

NOBODY = 65534


@dataclass
class Served:
    socket: Path
    log: Path
    env: dict[str, str]
    runs: Path
    proc: subprocess.Popen[bytes]

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AIRLOCK, "run", *args], capture_output=True, text=True,
                              env=env or self.env, cwd=ROOT, timeout=timeout)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([*AIRLOCK, "run", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env or self.env,
                                cwd=ROOT)

    def served(self, pid: int) -> bool:
        return f"run for client pid {pid}:" in self.log.read_text()

    def why_still_running(self, proc: subprocess.Popen[str], since: set[str]) -> str:
        """What to read when a client did not end in time: the server's log, the run's
        last events, the client's stderr (the client is killed to read it)."""
        proc.kill()
        _, err = proc.communicate(timeout=10)
        new = sorted(set(os.listdir(self.runs)) - since)
        events = self.runs / new[-1] / "events.jsonl" if new else None
        tail = events.read_text().splitlines()[-12:] if events and events.exists() else []
        return "\n".join(["client stderr:", err[-2000:], "server log:",
                          self.log.read_text()[-3000:], "run's last events:", *tail])

    def report(self, since: set[str]) -> dict:
        new = sorted(set(os.listdir(self.runs)) - since)
        assert new, "no run directory"
        path = self.runs / new[-1] / "report.json"
        assert wait_for(path.exists, 30), f"no report in {path.parent}"
        return json.loads(path.read_text())


def _start_server(tmp_path: Path, env: dict[str, str]) -> Served:
    # Under a directory any user may traverse, so that only the socket's own directory
    # (0700) keeps a second user out: that is what the permission tests exercise.
    base = Path(tempfile.mkdtemp(prefix="airlock-serve-test-"))
    os.chmod(base, 0o755)
    sock = base / "sock" / "serve.sock"
    log = tmp_path / "serve.log"
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**env, "AIRLOCK_SERVE_SOCKET": str(sock), "AIRLOCK_RUNS_DIR": str(runs)}
    env.pop("AIRLOCK_NO_SERVE", None)
    with log.open("wb") as fh:
        proc = subprocess.Popen([*AIRLOCK, "serve"], env=env, cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT)
    assert wait_for(lambda: "listening" in log.read_text() or proc.poll() is not None, 60)
    assert proc.poll() is None, log.read_text()
    return Served(sock, log, env, runs, proc)


def _stop(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    try:
        served.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        served.proc.wait()
    shutil.rmtree(served.socket.parent.parent, ignore_errors=True)


@pytest.fixture
def server(engine, tmp_path: Path) -> Iterator[Served]:
    served = _start_server(tmp_path, dict(os.environ))
    try:
        yield served
    finally:
        exists_before = served.socket.exists()
        _stop(served)
    assert exists_before  # the server was still there at the end of the test


def _managed(engine, run_id: str) -> list:
    return engine.api.containers(all=True, filters={"label": f"airlock.run={run_id}"})


# -- runs through the server ----------------------------------------------------------


def test_exit_codes_pass_through(server: Served):
    for cmd, code in ((["true"], 0), (["sh", "-c", "exit 7"], 7), (["false"], 1)):
        proc = server.popen("--quiet", "--", *cmd)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert server.served(proc.pid), server.log.read_text()


def test_bad_input_reads_as_in_process(server: Served, tmp_path: Path):
    """Errors come out the same, with the same exit code, whoever runs the command."""
    bad = write_policy(tmp_path, "extends: default\nnetwork: {mode: sideways}\n")
    for args in (["-p", bad, "--", "true"], ["--no-such-flag", "--", "true"],
                 ["-p", "no-such-preset", "--", "true"]):
        via = server.run(*args)
        local = server.run(*args, env=server.client_env(AIRLOCK_NO_SERVE="1"))
        assert via.returncode == local.returncode == 2, (via.stderr, local.stderr)
        assert via.stderr == local.stderr
        assert via.stdout == local.stdout


def test_output_streams_as_it_comes(server: Served):
    proc = server.popen("--quiet", "--", "sh", "-c",
                        "echo one; echo err-one >&2; sleep 3; echo two")
    assert proc.stdout is not None and proc.stderr is not None
    t0 = time.monotonic()
    assert proc.stdout.readline() == "one\n"
    assert time.monotonic() - t0 < 3  # not held back until the end
    assert proc.poll() is None
    assert proc.stderr.readline() == "err-one\n"
    assert proc.stdout.readline() == "two\n"
    assert proc.wait(timeout=60) == 0
    assert server.served(proc.pid)


def test_json_events_on_stdout(server: Served):
    proc = server.popen("--json", "--", "sh", "-c", "echo hello")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["type"] == "run.start" and events[-1]["type"] == "run.end"
    assert any(e["type"] == "agent.output" and "hello" in e["data"]["text"] for e in events)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_ends_the_run_interrupted(server: Served, engine, sig):
    since = set(os.listdir(server.runs))
    proc = server.popen("--", "sh", "-c", "echo started; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 30 s after {sig.name}\n"
                    + server.why_still_running(proc, since))
    assert code == 130
    report = server.report(since)
    assert report["status"] == "interrupted" and report["exit_code"] == 130
    assert wait_for(lambda: not _managed(engine, report["run_id"]), 30)
    assert server.served(proc.pid)


def test_sigkill_of_the_client_ends_its_run(server: Served, engine):
    since = set(os.listdir(server.runs))
    proc = server.popen("--", "sh", "-c", "echo started; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    t0 = time.monotonic()
    proc.kill()
    proc.wait(timeout=10)
    report = server.report(since)
    assert time.monotonic() - t0 < 30  # ended by the dropped connection, not by `sleep`
    assert report["status"] == "interrupted"
    assert wait_for(lambda: not _managed(engine, report["run_id"]), 30)


def test_the_run_gets_the_clients_environment_not_the_servers(engine, tmp_path: Path):
    policy = write_policy(tmp_path, "extends: default\nenv:\n  allow: [SERVE_T_VAR]\n")
    served = _start_server(tmp_path, {**os.environ, "SERVE_T_VAR": "server-value",
                                      "SERVE_T_KEY": "sk-server-key"})
    # The client's own environment: neither variable, unless a test adds it.
    client = {k: v for k, v in served.env.items() if k not in ("SERVE_T_VAR", "SERVE_T_KEY")}
    try:
        show = ["-q", "-p", policy, "--", "sh", "-c", 'echo "var=${SERVE_T_VAR-unset}"']
        mine = served.run(*show, env={**client, "SERVE_T_VAR": "client-value"})
        assert mine.returncode == 0, mine.stderr
        assert mine.stdout.strip() == "var=client-value"
        none = served.run(*show, env=client)  # the client has no such variable: nor its run
        assert none.returncode == 0, none.stderr
        assert none.stdout.strip() == "var=unset"

        # The provider key is the client's too: the server's own key is never used.
        keyed = write_policy(tmp_path, "extends: default\nnetwork: {mode: gateway}\n"
                             "provider: {backend: anthropic, api_key_env: SERVE_T_KEY}\n",
                             "keyed.yaml")
        without = served.run("-p", keyed, "--", "true", env=client)
        assert without.returncode == 3, without.stderr
        assert "SERVE_T_KEY" in without.stderr and "missing" in without.stderr
        with_key = served.run("-p", keyed, "--", "true",
                              env={**client, "SERVE_T_KEY": "sk-client-key"})
        assert with_key.returncode == 0, with_key.stderr
        assert served.log.read_text().count("run for client pid") == 4
    finally:
        _stop(served)


def test_without_a_server_the_client_runs_it_itself(engine, tmp_path: Path):
    env = {**os.environ, "AIRLOCK_SERVE_SOCKET": str(tmp_path / "none" / "serve.sock"),
           "AIRLOCK_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run([*AIRLOCK, "run", "-q", "--", "sh", "-c", "echo here; exit 5"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 5 and proc.stdout == "here\n", proc.stderr


def test_one_server_per_socket(server: Served):
    second = subprocess.run([*AIRLOCK, "serve"], capture_output=True, text=True,
                            env=server.env, cwd=ROOT, timeout=60)
    assert second.returncode == 1
    assert "already listens" in second.stderr


# -- only its own user ----------------------------------------------------------------


def test_socket_is_private_to_its_user(server: Served):
    d = server.socket.parent.stat()
    s = server.socket.stat()
    assert stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == os.geteuid()
    assert stat.S_ISSOCK(s.st_mode)
    assert stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == os.geteuid()


def _as_other_user(action) -> int:
    """Run `action()` in a child process as another uid; its return value is the status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = action()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_a_second_user_cannot_reach_the_socket(server: Served):
    def connect() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(server.socket))
        except PermissionError:
            return 0
        return 1

    assert _as_other_user(connect) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_the_server_refuses_another_uid_even_if_the_socket_is_opened_up(server: Served):
    """Defence in depth: with the modes loosened by mistake, SO_PEERCRED still says no."""
    from runner.server import protocol as p

    def hello() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(server.socket))
        try:
            # The server may close before the hello is even sent (EPIPE) or after (reset).
            p.send(s, p.HELLO, {"v": p.VERSION, "argv": ["--", "true"], "cwd": "/",
                                "env": {}}, fds=[0, 1, 2])
            answer = s.recv(1024)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
        return 0 if answer == b"" else 1  # closed without a word

    os.chmod(server.socket.parent, 0o755)
    os.chmod(server.socket, 0o666)
    try:
        assert _as_other_user(hello) == 0
    finally:
        os.chmod(server.socket, 0o600)
        os.chmod(server.socket.parent, 0o700)
    assert wait_for(lambda: f"refused a connection from uid {NOBODY}" in server.log.read_text(), 10)
    assert "run for client pid" not in server.log.read_text()


def test_the_client_ignores_a_socket_that_is_not_private(tmp_path: Path):
    from runner.server import client, paths

    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(d / "serve.sock"))
    listener.listen(1)
    try:
        os.chmod(d / "serve.sock", 0o600)
        assert client.connect(d / "serve.sock") is not None
        for dir_mode, sock_mode in ((0o755, 0o600), (0o700, 0o666), (0o770, 0o600)):
            os.chmod(d, dir_mode)
            os.chmod(d / "serve.sock", sock_mode)
            with pytest.raises(paths.InsecurePath):
                paths.check_socket(d / "serve.sock")
            assert client.connect(d / "serve.sock") is None
    finally:
        listener.close()


def test_the_server_will_not_start_in_a_shared_directory(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    proc = subprocess.run([*AIRLOCK, "serve", "--socket", str(shared / "serve.sock")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert "0700" in proc.stderr
    assert not (shared / "serve.sock").exists()


def test_thin_client_imports_no_heavy_modules():
    """The `airlock` entry point and the thin client import neither typer, pydantic or
    the docker SDK nor even pathlib or typing: each is milliseconds on every run."""
    code = ("import sys; before = set(sys.modules); import runner.entry, "
            "runner.server.client; new = set(sys.modules) - before; heavy = [m for m in "
            "('typer', 'pydantic', 'docker', 'requests', 'yaml', 'pathlib', 'typing', "
            "'runner.cli') if m in new]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# -- started by `airlock run` itself --------------------------------------------------


def _auto_env(tmp_path: Path) -> dict[str, str]:
    base = Path(tempfile.mkdtemp(prefix="airlock-auto-"))
    env = {**os.environ, "AIRLOCK_SERVE_SOCKET": str(base / "s" / "serve.sock"),
           "AIRLOCK_RUNS_DIR": str(tmp_path / "runs"), "SECRET_OF_THE_CLIENT": "sk-zzz"}
    env.pop("AIRLOCK_AUTO_SERVE", None)
    env.pop("AIRLOCK_NO_SERVE", None)
    return env


def _server_pid(sock: Path) -> int | None:
    try:
        return int(sock.with_suffix(".pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _end(pid: int | None, sock: Path) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60)
    shutil.rmtree(sock.parent.parent, ignore_errors=True)


def test_the_first_run_starts_a_server_for_the_next(engine, tmp_path: Path):
    env = _auto_env(tmp_path)
    sock = Path(env["AIRLOCK_SERVE_SOCKET"])
    pid = None
    try:
        # The first run goes in-process and must not wait for the server it starts:
        # captured output ends when the run does (the server holds none of our pipes).
        t0 = time.monotonic()
        first = subprocess.run([*AIRLOCK, "run", "-q", "--", "echo", "one"],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert first.returncode == 0 and first.stdout == "one\n", first.stderr
        assert time.monotonic() - t0 < 60
        assert wait_for(lambda: "listening" in _read(sock.parent / "serve.log"), 60)
        pid = _server_pid(sock)
        assert pid is not None
        # Detached: its own session, `/` as its directory, none of the client's secrets.
        assert os.getsid(pid) == pid and os.readlink(f"/proc/{pid}/cwd") == "/"
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"SECRET_OF_THE_CLIENT" not in environ and b"sk-zzz" not in environ
        log = sock.parent / "serve.log"
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        second = subprocess.Popen([*AIRLOCK, "run", "-q", "--", "echo", "two"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env, cwd=ROOT)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0 and out == "two\n", err
        assert f"run for client pid {second.pid}:" in log.read_text()
    finally:
        _end(pid, sock)


def test_a_server_whose_code_changed_hands_runs_back_and_drains(engine, tmp_path: Path):
    env = _auto_env(tmp_path)
    sock = Path(env["AIRLOCK_SERVE_SOCKET"])
    first = subprocess.run([*AIRLOCK, "run", "-q", "--", "true"], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=120)
    assert first.returncode == 0, first.stderr
    assert wait_for(lambda: "listening" in _read(sock.parent / "serve.log"), 60)
    pid = _server_pid(sock)
    module = ROOT / "runner" / "server" / "protocol.py"
    before = module.stat()
    try:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        run = subprocess.run([*AIRLOCK, "run", "-q", "--", "echo", "still"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert run.returncode == 0 and run.stdout == "still\n", run.stderr
        log = sock.parent / "serve.log"
        assert wait_for(lambda: "drained; exiting" in _read(log), 60), _read(log)
        assert "code on disk changed" in _read(log)
        assert wait_for(lambda: pid is not None and not Path(f"/proc/{pid}").exists(), 30)
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
        _end(pid, sock)


def test_auto_serve_can_be_turned_off(engine, tmp_path: Path):
    env = {**_auto_env(tmp_path), "AIRLOCK_AUTO_SERVE": "0"}
    sock = Path(env["AIRLOCK_SERVE_SOCKET"])
    try:
        run = subprocess.run([*AIRLOCK, "run", "-q", "--", "true"], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=120)
        assert run.returncode == 0, run.stderr
        time.sleep(2)
        assert not sock.parent.exists()
    finally:
        shutil.rmtree(sock.parent.parent, ignore_errors=True)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_two_servers_started_at_once_leave_one_owner(engine, tmp_path: Path):
    env = _auto_env(tmp_path)
    sock = Path(env["AIRLOCK_SERVE_SOCKET"])
    procs = [subprocess.Popen([*AIRLOCK, "serve", "--auto"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(3)]
    try:
        assert wait_for(lambda: sum(p.poll() is None for p in procs) == 1
                        and "listening" in _read(sock.parent / "serve.log"), 60)
        survivor = next(p for p in procs if p.poll() is None)
        assert all(p.returncode == 0 for p in procs if p is not survivor)  # quietly
        assert _server_pid(sock) == survivor.pid
        run = subprocess.Popen([*AIRLOCK, "run", "-q", "--", "true"], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        assert f"run for client pid {run.pid}:" in _read(sock.parent / "serve.log")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(60)
        shutil.rmtree(sock.parent.parent, ignore_errors=True)


def test_a_client_of_another_installation_is_handed_back(server: Served):
    from runner.server import client as cl
    from runner.server import protocol as proto

    sock = cl.connect(str(server.socket))
    assert sock is not None
    with sock:
        proto.send(sock, proto.HELLO, {"v": proto.VERSION, "argv": ["--", "true"],
                                       "cwd": str(ROOT), "env": {}, "prog": "airlock",
                                       "runner": "/somewhere/else/runner"}, fds=[0, 1, 2])
        frame = proto.Reader(sock).frame()
    assert frame is not None and frame[0] == proto.FALLBACK
    assert b"another installation" in frame[1]


def test_a_ctrl_c_before_the_server_hands_the_run_back_ends_it(tmp_path: Path):
    # The server answers FALLBACK (the client should run it itself) after the user's
    # Ctrl-C: nothing ran, and nothing may run now. Server side played on a socketpair.
    from runner.server import protocol as p
    from runner.server.client import _converse

    client, server = socket.socketpair()
    client.settimeout(10)  # a broken test fails instead of hanging
    server.settimeout(10)
    assert threading.current_thread() is threading.main_thread()  # signals land here
    default = signal.getsignal(signal.SIGINT)
    heard: list[bytes] = []

    def serve() -> None:
        # As the daemon does: it decides on FALLBACK before any NEED/ENV exchange.
        if not wait_for(lambda: signal.getsignal(signal.SIGINT) is not default, 10):
            return  # the client never listened: the assertions below say so
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while the server decides
        frame = p.Reader(server).frame()
        heard.append(frame[0] if frame else b"")
        p.send(server, p.FALLBACK, {"reason": "code changed"})

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with client, server:
        assert _converse(client) == 130  # not None: the client would run it in-process
    t.join(10)
    assert heard == [p.INTERRUPT]  # the client told the server, then was handed it back
