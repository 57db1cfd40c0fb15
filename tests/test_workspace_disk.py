"""The copy workspace and its patch against a hostile agent, from inside real sandboxes.

Each attack runs as the agent would run it; the assertions look at what the host paid
(memory of the whole `airlock` process tree, the run directory on disk, the time of the
patch step) and at what came back (the small legitimate change in the patch, the big
files listed, the exit reason).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.run.gc import SCRATCH_PREFIX
from runner.run.owner import owner_alive
from runner.run.workspace import leftover_mounts
from tests.conftest import AIRLOCK, ROOT, RUNTIMES, wait_for, write_policy

pytestmark = pytest.mark.usefixtures("engine")

MiB = 1 << 20


def run_measured(runs_dir: Path, *args: str, timeout: float = 300) -> tuple[int, str, str, Path, int]:
    """Run the CLI; return code, stdout, stderr, run dir and the peak RSS in bytes of the
    CLI and every process it waited for (git included)."""
    env = {**os.environ, "AIRLOCK_RUNS_DIR": str(runs_dir)}
    before = set(os.listdir(runs_dir)) if runs_dir.exists() else set()
    # Linux records the exec'ing process's old memory high-water mark in its maxrss, so a
    # child forked from this (large, long-lived) pytest process would report pytest's size.
    # A small launcher forks the CLI instead and reports what the CLI tree really peaked at.
    with open(runs_dir.parent / "out.txt", "w+b") as out, open(runs_dir.parent / "err.txt", "w+b") as err, \
            open(runs_dir.parent / "rusage.json", "w+") as measured:
        env["AIRLOCK_MEASURE_FD"] = str(measured.fileno())
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *AIRLOCK, *args], stdout=out,
                              stderr=err, env=env, cwd=ROOT, pass_fds=(measured.fileno(),),
                              timeout=timeout)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        measured.seek(0)
        report = measured.read()
    assert report, (proc.returncode, stderr)
    status, maxrss = json.loads(report)
    code = os.waitstatus_to_exitcode(status)
    new = sorted(set(os.listdir(runs_dir)) - before)
    assert new, stderr
    return code, stdout, stderr, runs_dir / new[-1], maxrss * 1024


_LAUNCHER = """
import json, os, sys
fd = int(os.environ.pop("AIRLOCK_MEASURE_FD"))
pid = os.fork()
if pid == 0:
    os.close(fd)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
os.write(fd, json.dumps([status, usage.ru_maxrss]).encode())
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def of(evs: list[dict], kind: str) -> list[dict]:
    return [e for e in evs if e["type"] == kind]


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("print('helo')\n")
    (ws / "README").write_text("a small project\n")
    return ws


def applies(ws: Path, patch: str, tmp_path: Path) -> None:
    """The patch applies to a fresh copy of the origin with git's own `apply`."""
    target = tmp_path / "apply"
    subprocess.run(["cp", "-a", str(ws), str(target)], check=True)
    (tmp_path / "p.patch").write_bytes(patch.encode("utf-8", "surrogateescape"))
    subprocess.run(["git", "apply", "--check", "-p1", str(tmp_path / "p.patch")], cwd=target,
                   check=True)


def no_mount_left() -> None:
    """No copy is still mounted for a process that has ended (other engineers' live runs
    on this engine may hold theirs)."""
    def owner(m: Path) -> str:
        try:
            return (m.parent / "owner").read_text().strip()
        except OSError:
            return ""

    assert not [m for m in leftover_mounts(SCRATCH_PREFIX) if not owner_alive(owner(m))]


ATTACK = r"""
import json, os, errno
out = {}
with open("/workspace/src/app.py", "w") as f:
    f.write("print('hello')\n")
# A sparse file far bigger than the copy: tmpfs holds it in no pages at all.
with open("/workspace/sparse.img", "wb") as f:
    f.truncate(3 << 30)
    f.seek((3 << 30) - 1)
    f.write(b"x")
# A real file over the per-file diff limit.
with open("/workspace/huge.bin", "wb") as f:
    for _ in range(20):
        f.write(os.urandom(1 << 20))
out["sparse"] = os.stat("/workspace/sparse.img").st_size
print(json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sparse_and_huge_files_are_listed_and_the_small_change_comes_back(
        runs_dir, tmp_path, runtime):
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy, copy_size: 64m, "
                                 "patch_file_size: 8m}\nnetwork: {mode: none}\n")
    code, stdout, stderr, run_dir, peak = run_measured(
        runs_dir, "run", "--quiet", "--policy", pol, "--runtime", runtime, "--workspace", str(ws),
        "--", "python3", "-c", ATTACK)
    assert json.loads(stdout.strip().splitlines()[-1])["sparse"] == 3 << 30, stderr
    report = json.loads((run_dir / "report.json").read_text())
    # The agent's command succeeded, but its workspace did not all come back: a cap.
    assert (code, report["status"], report["exit_reason"]) == (4, "budget_exceeded", "disk"), stderr
    left = {f["path"]: f for f in report["left_out"]["files"]}
    assert set(left) == {"sparse.img", "huge.bin"}, report["left_out"]
    assert left["sparse.img"]["reason"] == "file_size" and left["sparse.img"]["sparse"] is True
    assert left["sparse.img"]["size"] == 3 << 30
    assert left["huge.bin"]["reason"] == "file_size" and "sparse" not in left["huge.bin"]
    patch = (run_dir / "changes.patch").read_text()
    assert "-print('helo')" in patch and "+print('hello')" in patch
    assert "sparse.img" not in patch and "huge.bin" not in patch
    applies(ws, patch, tmp_path)
    evs = events(run_dir)
    assert of(evs, "workspace.left_out")[0]["data"]["count"] == 2
    assert of(evs, "disk.exceeded")[0]["data"]["cap"] == "patch"
    # The patch step read neither big file: it takes well under a second of the run's
    # time and the host process tree (CLI, git) stays small; before, the sparse file
    # alone cost seconds and gigabytes, then failed and lost the patch.
    step = of(evs, "workspace.patch")[0]["ts"] - of(evs, "sandbox.exited")[0]["ts"]
    print(f"\n{runtime}: patch step {step:.3f}s, peak RSS of the airlock tree {peak / MiB:.0f} MiB")
    assert step < 5, step
    assert peak < 400 * MiB, peak
    on_disk = sum(p.stat().st_size for p in run_dir.iterdir())
    assert on_disk < 1 * MiB, on_disk
    no_mount_left()


FILL = r"""
import json, os, errno
with open("/workspace/src/app.py", "w") as f:
    f.write("print('hello')\n")
out = {"written": 0}
try:
    with open("/workspace/fill.bin", "wb") as f:
        for _ in range(100):
            f.write(b"\0" * (1 << 20))
            out["written"] += 1 << 20
        f.flush()
        os.fsync(f.fileno())
except OSError as e:
    out["error"] = errno.errorcode[e.errno]
print(json.dumps(out), flush=True)
import time; time.sleep(30)
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_writing_past_the_copy_cap_gets_enospc_and_ends_the_run(runs_dir, tmp_path, runtime):
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy, copy_size: 16m}\n"
                                 "network: {mode: none}\n")
    code, stdout, stderr, run_dir, peak = run_measured(
        runs_dir, "run", "--quiet", "--policy", pol, "--runtime", runtime, "--workspace", str(ws),
        "--", "python3", "-c", FILL)
    out = json.loads(stdout.strip().splitlines()[-1])
    # Inside: the write fails for the right reason, at the cap (give or take the pages
    # the seed copy and the file system's own bookkeeping take).
    assert out["error"] == "ENOSPC", out
    assert 12 * MiB <= out["written"] <= 16 * MiB, out
    report = json.loads((run_dir / "report.json").read_text())
    # The run ended at once (not after the agent's 30 s sleep), with the copy's cap named.
    assert (code, report["exit_reason"]) == (4, "disk"), stderr
    assert report["duration_s"] < 25, report["duration_s"]
    evs = events(run_dir)
    assert of(evs, "disk.exceeded")[0]["data"] == {"cap": "copy_size", "limit": 16 * MiB}
    # What the agent changed before that is kept; the filler is too big to diff.
    patch = (run_dir / "changes.patch").read_text()
    assert "+print('hello')" in patch
    assert [f["path"] for f in report["left_out"]["files"]] == ["fill.bin"]
    assert not (ws / "fill.bin").exists()
    assert peak < 400 * MiB, peak
    no_mount_left()


def test_a_workspace_larger_than_the_copy_cap_is_refused(airlock, tmp_path):
    ws = workspace(tmp_path)
    (ws / "data.bin").write_bytes(os.urandom(3 * MiB))
    pol = write_policy(tmp_path, "filesystem: {workspace: copy, copy_size: 2m}\n"
                                 "network: {mode: none}\n")
    r = airlock("run", "--policy", pol, "--workspace", str(ws), "--", "true")
    assert r.code == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if "copy_size" in line]
    assert len(lines) == 1, r.stderr
    assert "needs 3.0 MiB" in lines[0] and "filesystem.copy_size 2.0 MiB" in lines[0], lines
    assert not r.run_dir or not any(e["type"] == "sandbox.created" for e in
                                    (json.loads(x) for x in
                                     (r.run_dir / "events.jsonl").read_text().splitlines()))
    # So is one with more files than copy_files allows.
    for i in range(20):
        (ws / f"f{i}").write_text("x")
    pol = write_policy(tmp_path, "filesystem: {workspace: copy, copy_files: 16}\n"
                                 "network: {mode: none}\n", name="files.yaml")
    r = airlock("run", "--policy", pol, "--workspace", str(ws), "--", "true")
    assert r.code == 2 and "filesystem.copy_files 16" in r.stderr, r.stderr
    no_mount_left()


def test_copy_mode_without_the_right_to_mount_is_not_ready(airlock, tmp_path):
    # Without CAP_SYS_ADMIN (a non-root user, or root without it) the copy cannot get
    # its size-capped file system: the run must stop, not fall back to an uncapped one.
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy}\nnetwork: {mode: none}\n")
    runs = tmp_path / "runs"
    proc = subprocess.run(["setpriv", "--bounding-set", "-sys_admin", *AIRLOCK, "run",
                           "--policy", pol, "--workspace", str(ws), "--", "true"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AIRLOCK_RUNS_DIR": str(runs)})
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "copy mode needs a size-capped filesystem" in proc.stderr, proc.stderr
    assert "Operation not permitted" in proc.stderr, proc.stderr
    run_dir = next(runs.iterdir())
    assert not any(json.loads(x)["type"] == "sandbox.created"
                   for x in (run_dir / "events.jsonl").read_text().splitlines())
    no_mount_left()


DEEP = r"""
import os
with open("/workspace/src/app.py", "w") as f:
    f.write("print('hello')\n")
os.chdir("/workspace")
for _ in range(40):  # 40 x 201 bytes: past PATH_MAX (4096) for the host's absolute path
    os.mkdir("d" * 200)
    os.chdir("d" * 200)
with open("deep.txt", "w") as f:
    f.write("deep\n")
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_path_past_path_max_is_listed_and_the_rest_comes_back(runs_dir, tmp_path, runtime):
    # Before, one such path made the special-file sweep raise and the whole patch was lost.
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy}\nnetwork: {mode: none}\n")
    code, _, stderr, run_dir, _ = run_measured(
        runs_dir, "run", "--quiet", "--policy", pol, "--runtime", runtime, "--workspace", str(ws),
        "--", "python3", "-c", DEEP)
    report = json.loads((run_dir / "report.json").read_text())
    assert (code, report["exit_reason"]) == (4, "disk"), stderr
    assert {f["reason"] for f in report["left_out"]["files"]} == {"unreadable"}, report["left_out"]
    assert all(f["path"].startswith("d" * 200) for f in report["left_out"]["files"])
    patch = (run_dir / "changes.patch").read_text()
    assert "+print('hello')" in patch
    assert not of(events(run_dir), "workspace.patch_failed")
    no_mount_left()


MANY = r"""
import os
os.mkdir("/workspace/gen")  # a new directory: too big to go to git whole under this cap
for i in range(3):
    with open(f"/workspace/gen/gen{i}.txt", "w") as f:
        f.write("".join(f"line {i} {n}\n" for n in range(60000)))
with open("/workspace/src/app.py", "w") as f:
    f.write("print('hello')\n")
"""


def test_the_patch_stops_at_its_cap_and_lists_the_rest(runs_dir, tmp_path):
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy, patch_size: 1m}\n"
                                 "network: {mode: none}\n")
    code, _, stderr, run_dir, _ = run_measured(
        runs_dir, "run", "--quiet", "--policy", pol, "--workspace", str(ws), "--",
        "python3", "-c", MANY)
    report = json.loads((run_dir / "report.json").read_text())
    assert (code, report["exit_reason"]) == (4, "disk"), stderr
    patch = (run_dir / "changes.patch").read_text()
    assert len(patch) <= 1 * MiB
    # Each generated file is ~0.8 MB of diff: one fits, two are listed; the small change
    # after them in path order still comes back.
    left = sorted(f["path"] for f in report["left_out"]["files"])
    assert left == ["gen/gen1.txt", "gen/gen2.txt"], report["left_out"]
    assert {f["reason"] for f in report["left_out"]["files"]} == {"patch_size"}
    assert "b/gen/gen0.txt" in patch and "+print('hello')" in patch
    applies(ws, patch, tmp_path)


LATIN = r"""
with open("/workspace/latin1.txt", "wb") as f:
    for n in range(60000):
        f.write(b"caf\xe9 \xff\xfe line %d\n" % n)
"""


def test_a_patch_of_non_utf8_text_does_not_swell_the_report(runs_dir, tmp_path):
    # JSON writes each byte that is not UTF-8 as a six-character escape: inline, a
    # patch of such text would make report.json several times the patch cap.
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy}\nnetwork: {mode: none}\n")
    code, _, stderr, run_dir, _ = run_measured(
        runs_dir, "run", "--quiet", "--policy", pol, "--workspace", str(ws), "--",
        "python3", "-c", LATIN)
    assert code == 0, stderr
    patch = (run_dir / "changes.patch").read_bytes()
    assert b"+caf\xe9 \xff\xfe line 59999" in patch and len(patch) > 1 * MiB
    report = json.loads((run_dir / "report.json").read_text())
    assert report["patch"] is None and report["patch_file"] == "changes.patch"
    assert (run_dir / "report.json").stat().st_size < 64 * 1024
    applies(ws, patch.decode("utf-8", "surrogateescape"), tmp_path)


def test_kill_9_mid_run_leaves_no_copy_mounted(tmp_path):
    # The reaper's gc detaches a dead run's copy: otherwise its memory stays held and
    # its scratch directory cannot be removed.
    ws = workspace(tmp_path)
    pol = write_policy(tmp_path, "filesystem: {workspace: copy}\nnetwork: {mode: none}\n")
    runs = tmp_path / "runs"
    proc = subprocess.Popen([*AIRLOCK, "run", "--quiet", "--policy", pol, "--workspace", str(ws),
                             "--", "sleep", "120"], cwd=ROOT,
                            env={**os.environ, "AIRLOCK_RUNS_DIR": str(runs)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def owner(m: Path) -> str:
        try:
            return (m.parent / "owner").read_text()
        except OSError:
            return ""

    def own_mounts() -> list[Path]:
        return [m for m in leftover_mounts(SCRATCH_PREFIX) if f":{proc.pid}:" in owner(m)]

    try:
        assert wait_for(lambda: bool(own_mounts()), 60)
        scratch = own_mounts()[0].parent
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_for(lambda: not own_mounts() and not scratch.exists(), 30)


def test_the_patch_rebuilds_the_copy_exactly_and_new_directories_go_to_git_whole(tmp_path):
    # The host half alone (prepare, the agent's edits made here, patch): every kind of
    # change, names git must quote, and a node_modules-sized new tree.
    from runner.run import workspace as w

    origin = tmp_path / "origin"
    (origin / "gone dir").mkdir(parents=True)
    (origin / "gone dir" / "z").write_text("z\n")
    (origin / "E").mkdir()
    (origin / "E" / "keep").write_text("k\n")
    (origin / "a.txt").write_text("x\n")
    (origin / 'we"ird\tname').write_text("q\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ws = w.prepare(origin, "copy", scratch, 1000, 1000, w.CopyLimits(64 * MiB, 10_000))
    assert ws.copy is not None
    try:
        copy = ws.copy
        for i in range(2000):
            d = copy / "node_modules" / f"pkg{i // 20}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.js").write_text(f"module.exports = {i};\n" * 20)
        (copy / "E" / "new" / "deep").mkdir(parents=True)
        (copy / "E" / "new" / "deep" / "n1").write_text("n1\n")
        (copy / "E" / "new" / "n2").write_bytes(b"\0\1\2binary")
        os.symlink("../../a.txt", copy / "E" / "new" / "link")
        subprocess.run(["rm", "-r", str(copy / "gone dir")], check=True)
        (copy / 'we"ird\tname').write_text("q2\n")
        (copy / 'new\tfile "x"').write_text("nn\n")
        (copy / "a.txt").chmod(0o755)
        import time
        t0 = time.monotonic()
        result = w.patch(ws)
        took = time.monotonic() - t0
        assert result.left_out_count == 0 and result.files == 2007, result.left_out
        # One git for the whole new tree: per file it took ~11 s for these 2000 here.
        assert took < 5, took
        target = tmp_path / "target"
        subprocess.run(["cp", "-a", str(origin), str(target)], check=True)
        (tmp_path / "p.patch").write_bytes(result.text.encode("utf-8", "surrogateescape"))
        subprocess.run(["git", "apply", "-p1", str(tmp_path / "p.patch")], cwd=target, check=True)
        same = subprocess.run(["diff", "-r", "--no-dereference", str(target), str(copy)],
                              capture_output=True, text=True)
        assert same.returncode == 0, same.stdout[:2000]
        assert os.stat(target / "a.txt").st_mode & 0o777 == 0o755
    finally:
        w.unmount(ws.copy)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
