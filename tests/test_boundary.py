"""The Docker boundary, asserted from inside the sandbox on runc and on runsc.

Each test attempts what must fail and checks the reason (the errno), so a weakened
boundary turns it red rather than passing by accident.
"""

from __future__ import annotations

import pytest

from runner.run.hostaddrs import host_addresses
from tests.conftest import PROBES, RUNTIMES, write_policy

pytestmark = pytest.mark.usefixtures("engine")


def probe(airlock, runtime: str, *args: str, policy: str = "default", timeout: float = 300):
    return airlock("run", "--quiet", "--policy", policy, "--runtime", runtime,
                   "--workspace", str(PROBES), "--", "python3", "/workspace/probe.py", *args,
                   timeout=timeout)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_filesystem_is_read_only_where_it_must_be(airlock, runtime, tmp_path):
    # A workspace the sandbox user could write if it were mounted writable: only the
    # read-only mount stands in the way, so the failure must be EROFS, not EACCES.
    ws = tmp_path / "ws"
    ws.mkdir()
    ws.chmod(0o777)
    (ws / "probe.py").write_text((PROBES / "probe.py").read_text())
    r = airlock("run", "--quiet", "--runtime", runtime, "--workspace", str(ws), "--",
                "python3", "/workspace/probe.py", "fs")
    assert r.code == 0, r.stderr
    out = r.probe()
    # gVisor checks permissions before the mount's read-only flag, so a root-owned
    # directory gives uid 1000 EACCES there; runc reports EROFS first.
    expected = ("EROFS",) if runtime == "runc" else ("EROFS", "EACCES")
    for path in ("/probe", "/etc/probe", "/usr/probe"):
        assert out[path] in expected, (path, out)
    assert out["root_mount_options"].split(",")[0] == "ro", out
    assert out["/workspace/probe"] == "EROFS", out
    assert not (ws / "probe").exists()
    assert out["/tmp/probe"] == "written"
    assert out["/home/airlock/probe"] == "written"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_root_filesystem_is_erofs_even_for_its_owner(airlock, runtime, tmp_path):
    # /workspace in the image is owned by uid 1000; without a workspace mount, only the
    # read-only root stands between the agent and it.
    r = airlock("run", "--quiet", "--runtime", runtime, "--", "sh", "-c",
                "touch /workspace/x 2>&1; touch /home/airlock/ok && echo home-ok")
    assert "Read-only file system" in r.stdout + r.stderr
    assert "home-ok" in r.stdout


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_only_loopback_and_host_unreachable(airlock, runtime, canary):
    addrs = host_addresses()
    assert addrs, "the host has no address to test against"
    r = probe(airlock, runtime, "net", str(canary.port), *addrs)
    assert r.code == 0, r.stderr
    out = r.probe()
    assert out["interfaces"] == ["lo"]
    assert out["routes4"] == []
    assert out["routes6_off_lo"] == []
    for addr, outcome in out["connects"].items():
        # No route (ENETUNREACH/EHOSTUNREACH) or no source address for that family
        # (EADDRNOTAVAIL): either way the kernel sent nothing.
        assert outcome in ("ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL"), (addr, outcome)
    assert out["dns"].startswith("gaierror")
    assert canary.hits == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_no_capabilities_and_not_root(airlock, runtime):
    out = probe(airlock, runtime, "ids").probe()
    assert out["uid"] != 0 and out["euid"] != 0 and out["gid"] != 0
    assert int(out["CapEff"], 16) == 0
    assert int(out["CapPrm"], 16) == 0
    assert int(out["CapBnd"], 16) == 0
    assert out["Seccomp"] == "2"


DENIED = ["unshare", "mount", "umount2", "pivot_root", "setns", "ptrace", "process_vm_readv",
          "bpf", "keyctl", "add_key", "request_key", "userfaultfd", "perf_event_open",
          "io_uring_setup", "personality", "kexec_load", "init_module", "socket_netlink",
          "socket_packet", "socket_vsock", "socket_inet_hi_bits"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_denied_syscalls_return_eperm(airlock, runtime):
    r = probe(airlock, runtime, "syscalls")
    assert r.code == 0, r.stderr
    out = r.probe()
    assert out["fork_works"] == "ok"
    wrong = {name: out[name] for name in DENIED if out[name] != "EPERM"}
    assert not wrong, wrong


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fork_bomb_is_stopped_and_the_run_ends_cleanly(airlock, runtime, tmp_path):
    policy = write_policy(tmp_path, "extends: default\nresources: {pids: 256, wall_time: 60s}\n")
    r = probe(airlock, runtime, "forkbomb", policy=policy, timeout=120)
    report = r.report
    assert report["status"] in ("succeeded", "failed"), report
    if r.code == 0:
        out = r.probe()
        assert out["error"] == "EAGAIN", out
        assert out["forked"] < 256
    else:
        # gVisor counts its own threads against the pids limit and may end the whole
        # sandbox instead of failing fork(): the run still ends and is cleaned up.
        assert runtime == "runsc", (r.code, r.stdout, r.stderr)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_memory_past_the_limit_ends_with_137(airlock, runtime, tmp_path):
    policy = write_policy(tmp_path, "extends: default\nresources: {memory: 64m}\n")
    r = probe(airlock, runtime, "memory", "512", policy=policy)
    assert r.code == 137, (r.code, r.stderr)
    assert r.report["status"] == "oom"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_wall_time_ends_with_124(airlock, runtime, tmp_path):
    policy = write_policy(tmp_path, "extends: default\nresources: {wall_time: 2s}\n")
    r = airlock("run", "--policy", policy, "--runtime", runtime, "--", "sleep", "60")
    assert r.code == 124, r.stderr
    assert r.report["status"] == "timeout"
    assert r.report["duration_s"] < 30


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_host_environment_is_not_visible(airlock, runtime):
    r = airlock("run", "--quiet", "--runtime", runtime, "--workspace", str(PROBES), "--",
                "python3", "/workspace/probe.py", "env",
                env={"AIRLOCK_TEST_SECRET": "s3cret-value", "ANTHROPIC_API_KEY": "sk-host-key",
                     "SOME_HOST_VAR": "visible?"})
    env = r.probe()["env"]
    assert "SOME_HOST_VAR" not in env
    assert "AIRLOCK_TEST_SECRET" not in env
    assert "sk-host-key" not in r.stdout and "s3cret-value" not in r.stdout
    assert env["HOME"] == "/home/airlock"


def test_command_exit_code_passes_through(airlock):
    r = airlock("run", "--", "sh", "-c", "exit 7")
    assert r.code == 7
    assert r.report["exit_reason"] == "command"
    assert r.report["status"] == "failed"


def test_engine_unreachable_exits_3_with_one_line(airlock, tmp_path):
    r = airlock("run", "--", "true", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert r.code == 3
    assert r.stderr.strip().startswith("airlock: no Docker Engine answers")
    assert "Traceback" not in r.stderr


def test_events_and_report_are_written(airlock):
    r = airlock("run", "--", "echo", "hello")
    assert r.code == 0
    types = [e["type"] for e in r.events()]
    assert types[0] == "run.start" and types[-1] == "run.end"
    for needed in ("sandbox.created", "sandbox.started", "selftest", "agent.started",
                   "sandbox.exited", "sandbox.removed"):
        assert needed in types
    out = [e for e in r.events() if e["type"] == "agent.output"]
    assert out and out[0]["source"] == "agent" and "hello" in out[0]["data"]["text"]
    assert r.report["policy_digest"].startswith("sha256:")


def test_exec_tmpfs_is_explicit(airlock, tmp_path):
    script = "cp /bin/true /tmp/t && /tmp/t && echo exec-ok"
    denied = airlock("run", "--quiet", "--", "sh", "-c", script)
    assert "exec-ok" not in denied.stdout and "Permission denied" in denied.stderr
    policy = write_policy(tmp_path, "extends: default\nfilesystem: {exec_tmpfs: [/tmp]}\n")
    allowed = airlock("run", "--quiet", "--policy", policy, "--", "sh", "-c", script)
    assert "exec-ok" in allowed.stdout
    assert any(e["type"] == "policy.widened" and "exec_tmpfs" in e["data"]["detail"]
               for e in allowed.events())
