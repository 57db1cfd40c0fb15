"""Warm pools: started sandboxes that hold nothing of a run until one claims them.

Every test runs real sandboxes on the real engine. What must hold with pools on:
a sandbox serves one run and is removed; a run sees its own sockets, environment and
files only, never an earlier run's or the warm-up's; the pool refills; a dead pool's
sandboxes end by themselves and `airlock gc` removes them; the escape suite passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner import Pool, execute, load_policy
from runner.agents import get_agent
from runner.conformance import ATTACKS, Suite
from runner.engines import get_engine
from runner.images.build import image_tag
from runner.policy.loader import policy_from_dict
from runner.run.orchestrator import with_agent_tmpfs
from runner.run.pool import LABEL_POOL, Recipe
from tests.conftest import RUNTIMES, wait_for
from tests.conftest import run_events as events

PRESET = {"runc": "default", "runsc": "strict"}


def recipe_for(policy, agent: str = "command") -> Recipe:
    a = get_agent(agent)
    return Recipe(with_agent_tmpfs(policy, a), image_tag(a.image))



def stdout(result) -> str:
    return "".join(e["data"]["text"] for e in events(result)
                   if e["type"] == "agent.output" and e["data"]["stream"] == "stdout")


def types(result) -> list[str]:
    return [e["type"] for e in events(result)]


@pytest.fixture
def pool(engine):
    with Pool(get_engine(), max_total=3) as p:
        yield p


def _pool_containers(docker_client, key: str, pid: int | None = None) -> list:
    """The pooled sandboxes of this boundary made by process `pid` (this one by default):
    another pool on the same engine (a user's own per-user server) is not the test's."""
    return [c for c in _of_pid(docker_client, os.getpid() if pid is None else pid)
            if c.labels[LABEL_POOL] == key[:16]]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_pooled_sandbox_serves_one_run_and_holds_nothing_before(engine, pool, tmp_path, runtime):
    policy = load_policy(PRESET[runtime])
    recipe = recipe_for(policy)
    pool.add(recipe, 1)
    assert pool.wait_ready(recipe, 1, timeout=120)

    # Before the claim: no run id, no run's socket, nothing in its environment.
    (warm,) = [c for c in _pool_containers(engine, recipe.key) if c.status == "running"]
    assert warm.labels["airlock.run"].startswith("pool-")
    image_env = set(engine.images.get(recipe.image).attrs["Config"]["Env"] or [])
    assert set(warm.attrs["Config"]["Env"]) - image_env <= {"HOME=/home/airlock", "LANG=C.UTF-8"}
    assert warm.attrs["Config"]["Cmd"][-1] == "--pool"
    run_dir = next(m["Source"] for m in warm.attrs["Mounts"] if m["Destination"] == "/run/airlock")
    assert os.listdir(run_dir) == []  # pool.sock is gone once the shim holds its connection

    # Listings by python3, not ls: Debian 12's runsc answers coreutils' statx with EINVAL.
    script = ("echo id=$AIRLOCK_RUN_ID; echo secret=${FIRST_SECRET:-none}; "
              "python3 -c 'import os; print(sorted(os.listdir(\"/run/airlock\")))'; "
              "cat /tmp/marker $HOME/marker 2>&1; echo mine > /tmp/marker; echo mine > $HOME/marker; "
              "true")
    first_policy = policy_from_dict({**policy.model_dump(mode="json"),
                                     "env": {"allow": [], "set": {"FIRST_SECRET": "s3cr3t"}}})
    assert recipe_for(first_policy).key == recipe.key  # the environment is not the boundary
    first = execute(["sh", "-c", script], agent="command", policy=first_policy, pool=pool,
                    runs_dir=tmp_path)
    assert first.exit_code == 0, stdout(first)
    assert "sandbox.claimed" in types(first) and "sandbox.created" not in types(first)
    out = stdout(first)
    assert f"id={first.run_id}" in out and "secret=s3cr3t" in out
    assert "pool.sock" not in out and "shim.cfg" not in out and "control.sock" in out
    selftest = next(e for e in events(first) if e["type"] == "selftest")
    assert selftest["data"]["ok"], selftest  # checked for this run, after the claim
    claimed = next(e for e in events(first) if e["type"] == "sandbox.claimed")["data"]["container"]
    # Used once: removed with its run.
    assert wait_for(lambda: not engine.containers.list(all=True, filters={"id": claimed}), 30)

    assert pool.wait_ready(recipe, 1, timeout=120)  # refilled
    second = execute(["sh", "-c", script], agent="command", policy=policy, pool=pool,
                     runs_dir=tmp_path)
    out2 = stdout(second)
    assert "sandbox.claimed" in types(second)
    assert next(e for e in events(second)
                if e["type"] == "sandbox.claimed")["data"]["container"] != claimed
    assert "mine" not in out2 and "secret=none" in out2 and f"id={second.run_id}" in out2
    assert out2.count("No such file") == 2
    stats = pool.stats()
    assert stats.claimed == 2 and stats.memory_bound <= 3 * policy.resources.memory


def test_a_run_without_a_ready_sandbox_starts_cold_and_the_pool_learns(engine, pool, tmp_path):
    policy = load_policy("default")
    first = execute(["true"], agent="command", policy=policy, pool=pool, runs_dir=tmp_path)
    assert first.exit_code == 0
    assert "sandbox.created" in types(first)  # cold: nothing was warm
    assert pool.wait_ready(recipe_for(policy), 1, timeout=120)  # learned from that demand
    second = execute(["true"], agent="command", policy=policy, pool=pool, runs_dir=tmp_path)
    assert "sandbox.claimed" in types(second)
    assert pool.stats().missed == 1


def test_runs_with_a_workspace_start_cold(engine, pool, tmp_path):
    policy = load_policy("default")
    pool.add(recipe_for(policy), 1)
    assert pool.wait_ready(recipe_for(policy), 1, timeout=120)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f.txt").write_text("hello")
    r = execute(["cat", "/workspace/f.txt"], agent="command", policy=policy, pool=pool,
                workspace=ws, runs_dir=tmp_path / "runs")
    assert r.exit_code == 0 and "hello" in stdout(r)
    assert "sandbox.created" in types(r)


def test_a_different_boundary_never_gets_a_pooled_sandbox(engine, pool, tmp_path):
    policy = load_policy("default")
    pool.add(recipe_for(policy), 1)
    assert pool.wait_ready(recipe_for(policy), 1, timeout=120)
    tighter = policy_from_dict({**policy.model_dump(mode="json"),
                                "resources": {**policy.resources.model_dump(mode="json"),
                                              "memory": "256m"}})
    assert recipe_for(tighter).key != recipe_for(policy).key
    r = execute(["sh", "-c", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes"
                 " 2>/dev/null"], agent="command", policy=tighter, pool=pool, runs_dir=tmp_path)
    assert "sandbox.created" in types(r)
    assert str(256 << 20) in stdout(r)


def test_a_killed_pool_leaves_nothing_after_gc(engine, tmp_path):
    code = (
        "import sys, time\n"
        "from runner import Pool, load_policy\n"
        "from runner.engines import get_engine\n"
        "from tests.test_pools import recipe_for\n"
        "pool = Pool(get_engine(), max_total=2)\n"
        "r = recipe_for(load_policy('default'))\n"
        "pool.add(r, 2)\n"
        "assert pool.wait_ready(r, 2, timeout=120)\n"
        "print(r.key, flush=True)\n"
        "time.sleep(600)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=root, env={**os.environ, "AIRLOCK_NO_REAPER": "1"})
    try:
        key = proc.stdout.readline().strip()
        assert key, "the pool did not get warm"
        assert len([c for c in _pool_containers(engine, key, proc.pid)
                    if c.status == "running"]) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The pool connection was each shim's dead-man switch: the sandboxes end by themselves.
    assert wait_for(lambda: all(c.status != "running"
                                for c in _pool_containers(engine, key, proc.pid)), 30)
    gc = subprocess.run([sys.executable, "-m", "runner.cli", "gc"], capture_output=True,
                        text=True, cwd=root, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert _pool_containers(engine, key, proc.pid) == []


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_escape_suite_passes_in_pooled_sandboxes(engine, runtime):
    from tests.test_conformance import _check_no_escape

    report = Suite(load_policy(PRESET[runtime]), runtime=runtime, pooled=True).run()
    assert len(report.results) == len(ATTACKS)
    _check_no_escape(report)
    pooled = {batch for batch, run in report.runs.items() if run["pooled"]}
    # the batches that carry a workspace start cold (see README, "Warm pools")
    assert pooled == set(report.runs) - {"workspace", "disk"}, report.runs


# -- the per-user server's pool --------------------------------------------------------


def _pooled_runs(runs: Path) -> list[bool]:
    out = []
    for d in runs.iterdir():
        evs = [json.loads(x) for x in (d / "events.jsonl").read_text().splitlines()]
        out.append((evs[0]["ts"], any(e["type"] == "sandbox.claimed" for e in evs)))
    return [claimed for _, claimed in sorted(out)]


def test_airlock_run_through_the_server_claims_from_its_pool(engine, tmp_path):
    from tests.test_serve import _start_server, _stop

    served = _start_server(tmp_path, dict(os.environ))
    try:
        first = served.run("--quiet", "--", "sh", "-c", "echo one")
        assert first.returncode == 0 and first.stdout == "one\n", first.stderr
        keeper_log = served.log.read_text()
        assert "pool: listening" in keeper_log
        keeper = _keeper_pid(served.log)
        # The first run taught the keeper this boundary; the next one finds it warm.
        assert wait_for(lambda: any(c.status == "running" for c in _of_pid(engine, keeper)), 60)
        second = served.run("--quiet", "--", "sh", "-c", "echo two; echo $AIRLOCK_RUN_ID")
        assert second.returncode == 0 and second.stdout.startswith("two\n"), second.stderr
        assert _pooled_runs(served.runs) == [False, True]
        # Exit codes pass through a pooled run as through a cold one.
        third = served.run("--", "sh", "-c", "exit 7")
        assert third.returncode == 7
        # A workspace run's boundary is learned too; the next such run gets its files
        # at the claim.
        proj = tmp_path / "proj"
        proj.mkdir()
        (proj / "f.txt").write_text("in the workspace\n")
        for boundaries in (1, 2):
            assert wait_for(lambda n=boundaries: len({c.labels[LABEL_POOL] for c in
                                                      _of_pid(engine, keeper)
                                                      if c.status == "running"}) >= n, 60)
            ws_run = served.run("--quiet", "--workspace", str(proj), "--", "cat",
                                "/workspace/f.txt")
            assert ws_run.returncode == 0 and ws_run.stdout == "in the workspace\n", \
                ws_run.stderr
        assert _pooled_runs(served.runs)[-1] is True, _pooled_runs(served.runs)
    finally:
        _stop(served)
    # A server that stops takes its pool's unclaimed sandboxes with it.
    assert wait_for(lambda: not _of_pid(engine, keeper), 60), _of_pid(engine, keeper)


def _keeper_pid(log: Path) -> int:
    match = re.search(r"airlock serve\[(\d+)\] pool: listening", log.read_text())
    assert match, log.read_text()
    return int(match.group(1))


def _of_pid(engine, pid: int) -> list:
    return [c for c in engine.containers.list(all=True, filters={"label": LABEL_POOL})
            if c.labels.get("airlock.owner", "").split(":")[1:2] == [str(pid)]]


def test_a_killed_server_leaves_no_pooled_sandbox_after_gc(engine, tmp_path):
    from tests.test_serve import _start_server

    served = _start_server(tmp_path, dict(os.environ))
    try:
        assert wait_for(lambda: "pool: listening" in served.log.read_text(), 30)
        keeper = _keeper_pid(served.log)
        assert served.run("--quiet", "--", "true").returncode == 0
        assert wait_for(lambda: any(c.status == "running" for c in _of_pid(engine, keeper)), 60)
    finally:
        # SIGKILL to the server and its keeper alike: nothing gets to clean up.
        for pid in (served.proc.pid, keeper):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        served.proc.wait()
    # The shims held the keeper's connections: they end by themselves...
    assert wait_for(lambda: all(c.status != "running" for c in _of_pid(engine, keeper)), 30)
    # ...and gc removes what is left.
    root = Path(__file__).resolve().parent.parent
    gc = subprocess.run([sys.executable, "-m", "runner.cli", "gc"], capture_output=True,
                        text=True, cwd=root, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert _of_pid(engine, keeper) == []


def test_readme_pool_example_runs_as_written(engine, tmp_path):
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = text.split("### Warm pools", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300,
                         env={**os.environ, "AIRLOCK_RUNS_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("succeeded") == 3
    claimed = 0
    for d in tmp_path.iterdir():
        claimed += '"sandbox.claimed"' in (d / "events.jsonl").read_text()
    assert claimed >= 2  # two were ready before the first run


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("mode", ["ro", "copy"])
def test_a_workspace_arrives_in_a_pooled_sandbox(engine, pool, tmp_path, runtime, mode):
    import subprocess as sp

    base = load_policy(PRESET[runtime])
    policy = policy_from_dict({**base.model_dump(mode="json"),
                               "filesystem": {**base.filesystem.model_dump(mode="json"),
                                              "workspace": mode}})
    recipe = Recipe(with_agent_tmpfs(policy, get_agent("command")), image_tag("base"), mode)
    pool.add(recipe, 1)
    assert pool.wait_ready(recipe, 1, timeout=120)
    (warm,) = [c for c in _pool_containers(engine, recipe.key) if c.status == "running"]
    ws_source = next(m["Source"] for m in warm.attrs["Mounts"] if m["Destination"] == "/workspace")
    assert os.listdir(ws_source) == []  # nothing of any workspace before the claim

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("one\n")
    sp.run(["git", "init", "-q", str(ws)], check=True)
    # the sandbox user's own 0600 file stays readable, as through a cold run's bind mount
    uid, _, gid = policy.process.user.partition(":")
    (ws / "own.txt").write_text("mine\n")
    os.chmod(ws / "own.txt", 0o600)
    os.chown(ws / "own.txt", int(uid), int(gid or uid))
    r = execute(["sh", "-c", "cat /workspace/a.txt /workspace/own.txt; "
                 "echo two >> /workspace/a.txt; echo $?"],
                agent="command", policy=policy, pool=pool, workspace=ws,
                runs_dir=tmp_path / "runs")
    assert "sandbox.claimed" in types(r)
    out = stdout(r)
    assert out.startswith("one\nmine\n"), out
    assert (ws / "a.txt").read_text() == "one\n"  # the host's directory is never written
    if mode == "copy":
        assert out.endswith("0\n") and r.patch and "+two" in r.patch
    else:
        assert not out.endswith("0\n") and not r.patch  # read-only inside
    assert not os.path.exists(ws_source)  # the snapshot or copy went with the run


def _empty_files(root: Path, count: int) -> None:
    root.mkdir()
    for i in range(0, count, 1000):
        d = root / f"d{i}"
        d.mkdir()
        for j in range(min(1000, count - i)):
            (d / f"f{j}").touch()


def test_a_read_only_workspace_of_many_empty_files_starts_cold(engine, pool, tmp_path):
    """Before: the pooled snapshot was bounded in bytes only, and empty files weigh
    none: 200,000 of them passed, and the claim copied them onto the host's disk (22 s,
    200,000 of its inodes) where a cold run binds them in 0.2 s."""
    from runner.run import workspace as ws_mod

    base = load_policy("default")
    policy = policy_from_dict({**base.model_dump(mode="json"),
                               "filesystem": {**base.filesystem.model_dump(mode="json"),
                                              "workspace": "ro"}})
    recipe = Recipe(with_agent_tmpfs(policy, get_agent("command")), image_tag("base"), "ro")
    pool.add(recipe, 1)
    ws = tmp_path / "ws"
    _empty_files(ws, ws_mod.POOLED_RO_FILES + 10)
    assert ws_mod.footprint(ws)[0] == 0  # nothing in bytes
    assert ws_mod.pooled_mode(ws, "ro") is None
    assert pool.wait_ready(recipe, 1, timeout=120)
    r = execute(["sh", "-c", "ls /workspace | wc -l"], agent="command", policy=policy,
                pool=pool, workspace=ws, runs_dir=tmp_path / "runs")
    assert r.exit_code == 0 and stdout(r).strip() == str(len(os.listdir(ws)))
    assert "sandbox.created" in types(r) and "sandbox.claimed" not in types(r)


def test_a_read_only_workspace_that_grows_while_copied_is_cut_off(tmp_path):
    """What the claim finds when the directory grew past the count after pooled_mode
    measured it (say, a run with the same directory rw adds entries): the copy stops
    at twice the cap, in entries of any kind, not only bytes."""
    from runner.errors import BadInput
    from runner.run import workspace as ws_mod

    ws = tmp_path / "ws"
    _empty_files(ws, 2 * ws_mod.POOLED_RO_FILES + 2000)
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(BadInput, match="grew past"):
        ws_mod.fill_pooled(ws, "ro", target, os.getuid(), os.getgid(),
                           ws_mod.CopyLimits(1 << 30, 100_000))
    made = sum(len(files) + len(dirs) for _, dirs, files in os.walk(target))
    assert made <= 2 * ws_mod.POOLED_RO_FILES


def _with_memory(policy, memory: str):
    return policy_from_dict({**policy.model_dump(mode="json"),
                             "resources": {**policy.resources.model_dump(mode="json"),
                                           "memory": memory}})


def test_what_a_pool_learns_is_bounded(engine):
    """A shared pool's callers choose the boundaries they ask for: the keys it remembers
    are capped, forgotten when idle, and none at all with learning off."""
    policy = load_policy("default")
    recipes = [recipe_for(_with_memory(policy, f"{m}m")) for m in (200, 210, 220)]
    # max_total 0: the bookkeeping alone, no sandbox is started.
    with Pool(get_engine(), max_total=0, max_keys=2) as p:
        for r in recipes:
            assert p.claim(r) is None
        s = p.stats()
        assert s.keys == 2 and s.missed == 3  # the least recently claimed was forgotten
    with Pool(get_engine(), max_total=0, max_per_key=0) as p:
        assert p.claim(recipes[0]) is None
        assert p.stats().keys == 0 and p.stats().missed == 1
        p.add(recipes[1], 0)
        assert p.stats().keys == 1  # an added (fixed) key is kept
    with Pool(get_engine(), max_total=0, idle=0.0) as p:
        p.claim(recipes[0])
        assert wait_for(lambda: p.stats().keys == 0, timeout=15)
