"""The multi-tenant service (`airlock serve --config`) over real HTTP, with real sandboxes.

Each test starts a real service process (runner.testing.service) on a loopback port
with its own SQLite database and runs directory, and talks to it with httpx as a
tenant would. Runs are real: the command agent in the real image on the real engine,
and the builtin agent against the scripted provider for the per-tenant key test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner.events.verify import verify_log
from runner.testing import ScriptedProvider
from runner.testing.service import ServiceProcess
from tests.conftest import AIRLOCK, wait_for

pytestmark = pytest.mark.usefixtures("engine")

MODEL = "claude-sonnet-4-5"


def floor_file(root: Path, name: str, body: str) -> str:
    path = root / f"{name}.yaml"
    path.write_text(body)
    return str(path)


def strict_floor(root: Path, provider_url: str = "http://127.0.0.1:9", prices: str = "",
                 name: str = "floor-strict") -> str:
    return floor_file(root, name, f"""\
extends: default
filesystem:
  workspace: ro
  tmpfs: {{/tmp: 64m, /home/airlock: 64m}}
network:
  mode: gateway
process:
  runtime: runsc
resources: {{memory: 512m, cpus: 1.0, pids: 256, wall_time: 120s, output_bytes: 1m}}
env:
  allow: [TZ]
provider:
  backend: anthropic
  base_url: {provider_url}
  api_key_env: ANTHROPIC_API_KEY
  models: {{default: {MODEL}}}
{prices}budgets: {{steps: 50, requests: 50, tokens: 100000, mcp_calls: 10}}
""")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One service for the tests that only talk to the API (or run a few quick commands)."""
    root = tmp_path_factory.mktemp("service")
    (root / "ws-acme" / "repo").mkdir(parents=True)
    (root / "ws-acme" / "repo" / "README").write_text("hello\n")
    (root / "ws-acme" / "a-file").write_text("x")
    (root / "outside").mkdir()
    os.symlink(root / "outside", root / "ws-acme" / "escape")
    proxy_floor = floor_file(root, "floor-proxy", """\
extends: default
network: {mode: proxy, allow: ["pkg.example.org:443"]}
""")
    svc = ServiceProcess(root, capacity=2, tenants={
        "acme": {"floor": "default", "workspaces": str(root / "ws-acme")},
        "copier": {"floor": "ci", "workspaces": str(root / "ws-acme")},
        "globex": {"floor": "default"},
        "strict": {"floor": strict_floor(root)},
        "proxied": {"floor": proxy_floor},
    })
    with svc:
        yield svc


# -- keys, auth, isolation -------------------------------------------------------------


def test_keys_new_prints_a_key_and_its_config_line() -> None:
    out = subprocess.run([*AIRLOCK, "keys", "new"], capture_output=True, text=True, check=True)
    key, line = out.stdout.strip().splitlines()
    assert key.startswith("alk_") and len(key) > 40
    assert line == f"api_key_sha256: {hashlib.sha256(key.encode()).hexdigest()}"
    again = subprocess.run([*AIRLOCK, "keys", "new"], capture_output=True, text=True, check=True)
    assert again.stdout.splitlines()[0] != key


def test_no_key_or_a_wrong_key_is_401(shared: ServiceProcess) -> None:
    with shared.client() as anon, shared.client(key="alk_" + "0" * 64) as wrong:
        for c in (anon, wrong):
            r = c.post("/v1/runs", json={"command": ["true"]})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert c.get("/v1/runs").status_code == 401
            assert c.get("/v1/usage").status_code == 401
            assert c.get("/metrics").status_code == 401
        assert anon.get("/healthz").json()["status"] == "ok"
        spec = anon.get("/openapi.json").json()
        for path in ("/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events",
                     "/v1/runs/{run_id}/cancel", "/v1/usage", "/healthz", "/metrics"):
            assert path in spec["paths"], path
        assert "RunRequest" in spec["components"]["schemas"]


def test_a_tenant_sees_only_its_own_runs(shared: ServiceProcess) -> None:
    with shared.client("acme") as acme, shared.client("globex") as globex:
        r = acme.post("/v1/runs", json={"agent": "command", "command": ["echo", "mine"]})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        assert r.json()["status"] == "queued"
        info = shared.wait(acme, run_id)
        assert info["status"] == "succeeded" and info["exit_code"] == 0
        # Another tenant's run answers exactly like one that does not exist.
        for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events",
                     f"/v1/runs/{run_id}/patch"):
            got, missing = globex.get(path), globex.get("/v1/runs/20990101-000000-0000000000")
            assert got.status_code == missing.status_code == 404
        assert globex.post(f"/v1/runs/{run_id}/cancel").status_code == 404
        assert run_id not in [x["id"] for x in globex.get("/v1/runs").json()["runs"]]
        assert run_id in [x["id"] for x in acme.get("/v1/runs").json()["runs"]]
        # The run directory is the service's alone.
        tenant_dir = shared.runs_dir / "acme"
        assert tenant_dir.stat().st_mode & 0o777 == 0o700
        assert (tenant_dir / run_id).stat().st_mode & 0o777 == 0o700
        assert (tenant_dir / run_id / "events.jsonl").stat().st_mode & 0o077 == 0


def test_events_stream_as_sse_and_jsonl_and_end_with_the_run(shared: ServiceProcess) -> None:
    with shared.client("acme") as acme:
        run_id = acme.post("/v1/runs", json={
            "command": ["sh", "-c", "echo one; sleep 1; echo two"]}).json()["id"]
        lines = []
        with acme.stream("GET", f"/v1/runs/{run_id}/events", params={"format": "jsonl"}) as r:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            for line in r.iter_lines():
                lines.append(json.loads(line))
        types = [e["type"] for e in lines]
        assert types[0] == "run.start" and types[-1] == "run.end"
        text = "".join(e["data"].get("text", "") for e in lines if e["type"] == "agent.output")
        assert "one" in text and "two" in text
        with acme.stream("GET", f"/v1/runs/{run_id}/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            body = r.read().decode()
        assert body.count("\ndata: ") + body.startswith("data: ") == len(lines) or \
            body.count("data: ") == len(lines)
        assert "event: run.end" in body
        assert verify_log(shared.runs_dir / "acme" / run_id / "events.jsonl", run_id=run_id) == []


def test_usage_and_metrics(shared: ServiceProcess) -> None:
    with shared.client("globex") as globex:
        run_id = globex.post("/v1/runs", json={
            "command": ["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 1"],
        }).json()["id"]
        info = shared.wait(globex, run_id)
        assert info["status"] == "succeeded", info
        u = info["usage"]
        assert u["wall_seconds"] > 1.0
        assert u["cpu_seconds"] > 0.05  # from the engine's stats, sampled while it ran
        assert u["peak_memory_bytes"] > 100_000
        usage = globex.get("/v1/usage").json()
        assert usage["tenant"] == "globex" and usage["totals"]["runs"] >= 1
        assert usage["totals"]["cpu_seconds"] >= u["cpu_seconds"]
    with shared.client(key=shared.operator_key) as op:
        text = op.get("/metrics").text
    assert 'airlock_tenant_runs_total{tenant="globex"}' in text
    assert 'airlock_tenant_cpu_seconds_total{tenant="globex"}' in text
    assert 'airlock_tenant_runs{state="queued",tenant="acme"}' in text
    with shared.client("globex") as globex:
        assert globex.get("/metrics").status_code == 401  # a tenant key is not the operator's


# -- floors ------------------------------------------------------------------------------

WIDENINGS: list[tuple[str, dict[str, Any], str]] = [
    ("strict", {"process": {"runtime": "runc"}}, "process.runtime"),
    ("strict", {"network": {"mode": "proxy", "allow": ["example.org:443"]}}, "network.mode"),
    ("strict", {"filesystem": {"workspace": "rw"}}, "filesystem.workspace"),
    ("strict", {"filesystem": {"tmpfs": {"/tmp": "128m"}}}, "filesystem.tmpfs./tmp"),
    ("strict", {"resources": {"memory": "1g"}}, "resources.memory"),
    ("strict", {"resources": {"cpus": 2}}, "resources.cpus"),
    ("strict", {"resources": {"pids": 1024}}, "resources.pids"),
    ("strict", {"resources": {"wall_time": "1h"}}, "resources.wall_time"),
    ("strict", {"resources": {"output_bytes": "64m"}}, "resources.output_bytes"),
    ("strict", {"budgets": {"tokens": 10_000_000}}, "budgets.tokens"),
    ("strict", {"budgets": {"requests": None}}, "budgets.requests"),
    ("strict", {"env": {"allow": ["TZ", "LC_ALL"]}}, "env.allow"),
    ("strict", {"process": {"capabilities": ["NET_BIND_SERVICE"]}}, "process.capabilities"),
    ("strict", {"process": {"seccomp": {"allow": ["io_setup"]}}}, "process.seccomp.allow"),
    ("strict", {"provider": {"base_url": "http://127.0.0.1:1"}}, "provider.base_url"),
    ("strict", {"provider": {"backend": "openai-compatible"}}, "provider.backend"),
    ("strict", {"provider": {"models": {"default": "some-other-model"}}}, "provider.models"),
    ("strict", {"mcp": {"tools": ["os:system"]}}, "mcp.tools"),
    ("proxied", {"network": {"allow": ["evil.example.com:443"]}}, "network.allow"),
    ("acme", {"provider": {"backend": "anthropic", "base_url": "http://127.0.0.1:1"}},
     "provider"),
]


@pytest.mark.parametrize(("tenant", "policy", "key"), WIDENINGS,
                         ids=[f"{t}-{k}" for t, _, k in WIDENINGS])
def test_each_widening_of_the_floor_is_refused_naming_the_key(
        shared: ServiceProcess, tenant: str, policy: dict[str, Any], key: str) -> None:
    with shared.client(tenant) as c:
        before = c.get("/v1/runs").json()["runs"]
        r = c.post("/v1/runs", json={"command": ["true"], "policy": policy})
        assert r.status_code == 403, r.text
        assert f"{key}:" in r.json()["error"], r.json()
        # The same, sent as YAML text.
        import yaml

        r = c.post("/v1/runs", json={"command": ["true"], "policy": yaml.safe_dump(policy)})
        assert r.status_code == 403 and f"{key}:" in r.json()["error"]
        assert c.get("/v1/runs").json()["runs"] == before  # nothing half-created


def test_a_tightening_is_accepted_and_applied(shared: ServiceProcess) -> None:
    with shared.client("acme") as acme:
        r = acme.post("/v1/runs", json={
            "command": ["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
                        "2>/dev/null || cat /sys/fs/cgroup/memory.max"],
            "policy": "resources: {memory: 256m}\nnetwork: {mode: none}\nbudgets: {steps: 5}\n"})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        info = shared.wait(acme, run_id)
        assert info["status"] == "succeeded", info
        policy = json.loads((shared.runs_dir / "acme" / run_id / "policy.json").read_text())
        assert policy["resources"]["memory"] == "256m"
        assert policy["network"]["mode"] == "none"
        out = "".join(json.loads(x)["data"].get("text", "") for x in
                      (shared.runs_dir / "acme" / run_id / "events.jsonl").read_text().splitlines()
                      if '"agent.output"' in x)
        assert str(256 << 20) in out  # the engine enforces the tightened limit


# -- workspaces --------------------------------------------------------------------------

WORKSPACES = [("..", 403), ("/", 403), ("/etc", 403), ("escape", 403), ("repo/../..", 403),
              ("a-file", 400), ("missing", 400)]


@pytest.mark.parametrize(("path", "status"), WORKSPACES, ids=[p for p, _ in WORKSPACES])
def test_workspaces_outside_the_tenant_root_are_refused(shared: ServiceProcess, path: str,
                                                        status: int) -> None:
    with shared.client("acme") as acme:
        r = acme.post("/v1/runs", json={"command": ["true"], "workspace": path})
        assert r.status_code == status, r.text
        assert r.json()["error"].startswith("workspace:")
    with shared.client("globex") as globex:  # no workspaces root at all
        r = globex.post("/v1/runs", json={"command": ["true"], "workspace": "repo"})
        assert r.status_code == 403


def test_a_workspace_under_the_root_is_mounted(shared: ServiceProcess) -> None:
    with shared.client("acme") as acme:
        run_id = acme.post("/v1/runs", json={"command": ["cat", "/workspace/README"],
                                             "workspace": "repo"}).json()["id"]
        assert shared.wait(acme, run_id)["status"] == "succeeded"
        log = (shared.runs_dir / "acme" / run_id / "events.jsonl").read_text()
        assert "hello" in log


@pytest.mark.parametrize("where", ["itself", "a parent"])
def test_a_workspace_swapped_for_a_symlink_while_queued_is_not_mounted(
        tmp_path: Path, where: str) -> None:
    """Before: the path was checked when the run was queued and mounted when it started;
    a symlink put in its place meanwhile (by the tenant, or by its own `rw` run, which
    is how it was measured) had the queued run read another tenant's workspace."""
    root = tmp_path / "ws-mallory"
    (root / "team" / "repo").mkdir(parents=True)
    (root / "team" / "repo" / "mine").write_text("mine\n")
    victim = tmp_path / "ws-victim"
    victim.mkdir()
    (victim / "secret").write_text("VICTIM-SECRET\n")
    with ServiceProcess(tmp_path / "svc", capacity=1, tenants={
            "mallory": {"floor": "default", "workspaces": str(root)},
            "victim": {"floor": "default", "workspaces": str(victim)}}) as svc, \
            svc.client("mallory") as c:
        blocker = c.post("/v1/runs", json={"command": ["sleep", "4"]}).json()["id"]
        r = c.post("/v1/runs", json={"command": ["sh", "-c", "cat /workspace/*"],
                                     "workspace": "team/repo"})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        assert c.get(f"/v1/runs/{run_id}").json()["status"] == "queued"
        swapped = root / "team" / "repo" if where == "itself" else root / "team"
        swapped.rename(swapped.with_name(swapped.name + ".old"))
        if where == "itself":
            swapped.symlink_to(victim)
        else:
            (tmp_path / "elsewhere").mkdir()
            os.symlink(victim, tmp_path / "elsewhere" / "repo")
            swapped.symlink_to(tmp_path / "elsewhere")
        svc.wait(c, blocker)
        info = svc.wait(c, run_id)
        assert info["status"] == "failed" and info["exit_reason"] == "workspace_changed", info
        log = c.get(f"/v1/runs/{run_id}/events", params={"format": "jsonl"}).text
        assert "VICTIM-SECRET" not in log


def test_a_pinned_workspace_is_the_directory_checked_whatever_is_swapped_in(
        tmp_path: Path) -> None:
    """The check and the mount are one: the mount is of the directory reached without
    following a symlink, by its descriptor, onto a path nobody else can change."""
    from runner.service.pin import Moved, Pinned

    root = tmp_path / "root"
    (root / "team" / "repo").mkdir(parents=True)
    (root / "team" / "repo" / "mine").write_text("mine\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret").write_text("OTHER\n")
    pinned = Pinned(root, root / "team" / "repo")
    try:
        (root / "team" / "repo").rename(root / "team" / "repo.old")
        (root / "team" / "repo").symlink_to(other)  # swapped after the pin
        assert sorted(os.listdir(pinned.path)) == ["mine"]
        assert oct(os.stat(pinned.scratch).st_mode & 0o777) == "0o700"
        with pytest.raises(Moved):  # and a pin now refuses the symlink
            Pinned(root, root / "team" / "repo")
        (root / "team").rename(root / "team2")
        (root / "team").symlink_to(root / "team2")
        with pytest.raises(Moved):  # a symlink higher up too
            Pinned(root, root / "team" / "repo.old")
    finally:
        pinned.release()
    assert not pinned.scratch.exists()
    assert (root / "team2" / "repo.old" / "mine").read_text() == "mine\n"  # never removed


def test_a_sandbox_racing_symlinks_never_gets_another_tenants_workspace(tmp_path: Path) -> None:
    """Measured before the pin, with only a check before the run: a tenant's own `rw`
    run exchanging `repo` and a symlink to another tenant's workspace every 0.5 ms
    (renameat2 RENAME_EXCHANGE) got 2 of 12 runs naming `repo` to mount it."""
    root = tmp_path / "ws-mallory"
    (root / "repo").mkdir(parents=True)
    (root / "repo" / "mine").write_text("mine\n")
    victim = tmp_path / "ws-victim"
    victim.mkdir()
    (victim / "secret").write_text("VICTIM-SECRET\n")
    (root / "repo.sym").symlink_to(victim)
    for p in (root, root / "repo", root / "repo" / "mine"):
        os.chown(p, 1000, 1000)
    os.lchown(root / "repo.sym", 1000, 1000)
    rw = floor_file(tmp_path, "rw", "extends: default\nfilesystem: {workspace: rw}\n")
    swapper = ("import ctypes, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\n"
               "os.chdir('/workspace')\nend = time.time() + 40\nwhile time.time() < end:\n"
               "    libc.renameat2(-100, b'repo', -100, b'repo.sym', 2)\n    time.sleep(0.0005)\n")
    with ServiceProcess(tmp_path / "svc", capacity=3, tenants={
            "mallory": {"floor": rw, "workspaces": str(root)},
            "victim": {"floor": "default", "workspaces": str(victim)}}) as svc, \
            svc.client("mallory") as c:
        racer = c.post("/v1/runs", json={"command": ["python3", "-c", swapper],
                                         "workspace": ".",
                                         "policy": {"filesystem": {"workspace": "rw"}}}).json()
        assert wait_for(lambda: c.get(f"/v1/runs/{racer['id']}").json()["status"] == "running",
                        60)
        time.sleep(1)
        runs: list[str] = []
        deadline = time.monotonic() + 30
        while len(runs) < 10 and time.monotonic() < deadline:
            r = c.post("/v1/runs", json={"command": ["sh", "-c", "cat /workspace/*"],
                                         "workspace": "repo"})
            if r.status_code == 201:
                runs.append(r.json()["id"])
        assert len(runs) >= 5
        for run_id in runs:
            info = svc.wait(c, run_id)
            log = c.get(f"/v1/runs/{run_id}/events", params={"format": "jsonl"}).text
            assert "VICTIM-SECRET" not in log, info
            errors = [line for line in log.splitlines() if '"run.error"' in line]
            assert info["status"] == "succeeded" or info["exit_reason"] == "workspace_changed", \
                (info, errors)
        c.post(f"/v1/runs/{racer['id']}/cancel")


def test_a_copy_mode_runs_patch_is_its_tenants_alone(shared: ServiceProcess) -> None:
    with shared.client("copier") as c, shared.client("acme") as acme:
        run_id = c.post("/v1/runs", json={
            "command": ["sh", "-c", "echo added > /workspace/NEW && echo more >> /workspace/README"],
            "workspace": "repo"}).json()["id"]
        assert shared.wait(c, run_id)["status"] == "succeeded"
        r = c.get(f"/v1/runs/{run_id}/patch")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/x-diff")
        assert "+added" in r.text and "+more" in r.text
        assert acme.get(f"/v1/runs/{run_id}/patch").status_code == 404
    # The host's directory is untouched: the agent wrote a private copy.
    assert not (shared.root / "ws-acme" / "repo" / "NEW").exists()
    assert (shared.root / "ws-acme" / "repo" / "README").read_text() == "hello\n"


def test_a_large_patch_is_sent_as_it_is_read(shared: ServiceProcess) -> None:
    """Before: the patch (up to patch_size, 32 MiB) was read whole per request; 40
    clients reading a 26 MB patch slowly held the service at +930 MB."""
    import socket

    assert shared.proc is not None
    with shared.client("copier") as c:
        run_id = c.post("/v1/runs", json={"command": ["sh", "-c", (
            "for i in 1 2 3; do head -c 4000000 /dev/urandom | base64 > /workspace/big$i; done")],
            "workspace": "repo"}).json()["id"]
        assert shared.wait(c, run_id)["status"] == "succeeded"
        whole = c.get(f"/v1/runs/{run_id}/patch")
        assert whole.status_code == 200 and len(whole.content) > 15 << 20
        before = _rss_kib(shared.proc.pid)
        readers = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /v1/runs/{run_id}/patch HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {shared.keys['copier']}\r\n\r\n".encode())
            readers.append(s)
        time.sleep(3)
        grown = _rss_kib(shared.proc.pid) - before
        for s in readers:
            s.close()
        assert grown < 64 << 10, f"{grown} KiB held for 20 slow readers"


# -- bad input ---------------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "resources: {memory: 256m}\n"


def test_bad_input_gets_one_line_and_the_right_status(shared: ServiceProcess) -> None:
    cases: list[tuple[dict[str, Any], int]] = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 422),
        ({"content": b"command=true"}, 400),
        ({"json": {"command": "true"}}, 422),
        ({"json": {"command": ["true"], "colour": "red"}}, 422),
        ({"json": {"agent": "nope", "command": ["true"]}}, 422),
        ({"json": {"agent": "builtin"}}, 422),
        ({"json": {"command": ["true"], "policy": {"resources": {"memroy": "1g"}}}}, 422),
        ({"json": {"command": ["true"], "policy": {"resources": {"memory": "lots"}}}}, 422),
        ({"json": {"command": ["true"], "policy": "resources: [\n"}}, 400),
        ({"json": {"command": ["true"], "policy": "a: &a [*a]\n"}}, 400),
        ({"json": {"command": ["true"], "policy": BILLION_LAUGHS}}, 400),
        ({"json": {"command": ["true"], "policy": {"extends": "/etc/passwd"}}}, 400),
        ({"json": {"command": ["true"], "policy": 42}}, 422),
        # NaN passed every bound and the floor's "more than" (then the run failed); 400
        # digits made int() raise OverflowError (500)
        ({"json": {"command": ["true"], "policy": "resources: {wall_time: .nan}\n"}}, 422),
        ({"content": b'{"command": ["true"], "policy": {"network": {"limits": '
                     b'{"head_timeout": NaN, "body_timeout": Infinity}}}}',
          "headers": {"content-type": "application/json"}}, 422),
        ({"json": {"command": ["true"], "policy": {"resources": {"memory": "9" * 400 + "g"}}}},
         422),
        ({"json": {"command": ["true"], "policy": {"resources": {"wall_time": "9" * 400}}}},
         422),
        # YAML's non-JSON scalars: before, a TypeError after parsing (500)
        ({"json": {"command": ["true"], "policy": "resources: !!binary aGk=\n"}}, 400),
        ({"json": {"command": ["x" * (2 << 20)]}}, 413),
    ]
    with shared.client("globex") as c:
        before = c.get("/v1/runs").json()["runs"]
        for kwargs, status in cases:
            t0 = time.monotonic()
            r = c.post("/v1/runs", **kwargs)
            assert r.status_code == status, (kwargs.get("json", kwargs.get("content")), r.text)
            error = r.json()["error"]
            assert "\n" not in error and "Traceback" not in error and error
            assert time.monotonic() - t0 < 10
        assert c.get("/v1/runs").json()["runs"] == before  # no half-created run


def test_an_oversized_chunked_body_is_refused_before_it_is_read_whole(
        shared: ServiceProcess) -> None:
    sent = {"n": 0}

    def body() -> Any:
        for _ in range(64):  # 64 MiB offered; the service stops reading after 1 MiB
            sent["n"] += 1
            yield b"x" * (1 << 20)

    with shared.client("globex") as c:
        try:
            r = c.post("/v1/runs", content=body(), headers={"content-type": "application/json"})
            assert r.status_code == 413
        except httpx.HTTPError:
            pass  # the service may close the connection while the client still sends
    assert sent["n"] < 64


# -- quotas and fairness -----------------------------------------------------------------


def test_quotas_answer_429_with_retry_after(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path, capacity=1, tenants={
        "small": {"floor": "default", "quota": {"concurrent": 1, "queued": 2}},
        "daily": {"floor": "default", "quota": {"runs_per_day": 2}},
    }) as svc, svc.client("small") as small, svc.client("daily") as daily:
        ids = []
        for _ in range(3):  # one runs, two wait
            r = small.post("/v1/runs", json={"command": ["sleep", "30"]})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        svc.wait(small, ids[0], until={"running"}, timeout=60)
        r = small.post("/v1/runs", json={"command": ["true"]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "queued" in r.json()["error"]
        for _ in range(2):
            assert daily.post("/v1/runs", json={"command": ["true"]}).status_code == 201
        r = daily.post("/v1/runs", json={"command": ["true"]})
        assert r.status_code == 429 and "runs_per_day" in r.json()["error"]
        assert int(r.headers["retry-after"]) <= 86400
        # A cancelled queued run frees its place at once.
        assert small.post(f"/v1/runs/{ids[2]}/cancel").json()["status"] == "cancelled"
        assert small.post("/v1/runs", json={"command": ["true"]}).status_code == 201
        for run_id in ids[:2]:
            small.post(f"/v1/runs/{run_id}/cancel")
        assert svc.wait(small, ids[0])["status"] == "cancelled"


def test_a_backlog_delays_another_tenants_run_by_at_most_one_slot(tmp_path: Path) -> None:
    with ServiceProcess(tmp_path, capacity=1, tenants={
        "busy": {"floor": "default", "quota": {"queued": 100}},
        "quiet": {"floor": "default"},
    }) as svc, svc.client("busy") as busy, svc.client("quiet") as quiet:
        backlog = [busy.post("/v1/runs", json={"command": ["sleep", "1"]}).json()["id"]
                   for _ in range(12)]
        svc.wait(busy, backlog[0], until={"running"}, timeout=60)
        mine = quiet.post("/v1/runs", json={"command": ["true"]}).json()["id"]
        done = svc.wait(quiet, mine, timeout=120)
        assert done["status"] == "succeeded"
        infos = [busy.get(f"/v1/runs/{i}").json() for i in backlog]
        before = [i for i in infos if i["started_at"] and i["started_at"] < done["started_at"]]
        assert len(before) <= 2, before  # the one running when it came, and at most one more
        assert len(before) >= 1
        for i in backlog:
            busy.post(f"/v1/runs/{i}/cancel")


# -- the provider key per tenant --------------------------------------------------------


def test_each_tenants_provider_key_is_used_for_its_runs_only(tmp_path: Path) -> None:
    with ScriptedProvider([{"text": "done", "usage": {"input_tokens": 60_000, "output_tokens": 10}}],
                          loop=True) as upstream:
        floor = strict_floor(tmp_path, upstream.url)
        # b's floor prices its model: its usage and the operator's metrics carry a cost
        priced = strict_floor(tmp_path, upstream.url, name="floor-priced", prices=(
            "  prices: {'*': {input_per_mtok: 3, output_per_mtok: 15}}\n"))
        env = {"SVC_KEY_A": "sk-tenant-a-" + "a" * 24, "SVC_KEY_B": "sk-tenant-b-" + "b" * 24}
        with ServiceProcess(tmp_path, capacity=2, env=env, tenants={
            "a": {"floor": floor, "provider_keys": {"ANTHROPIC_API_KEY": "SVC_KEY_A"},
                  "quota": {"tokens_per_day": 50_000}},
            "b": {"floor": priced, "provider_keys": {"ANTHROPIC_API_KEY": "SVC_KEY_B"}},
            "c": {"floor": floor},
        }) as svc:
            seen: dict[str, set[str | None]] = {}
            for tenant in ("a", "b"):
                n = len(upstream.requests)
                with svc.client(tenant) as c:
                    r = c.post("/v1/runs", json={"agent": "builtin", "task": "say done",
                                                 "model": "default"})
                    assert r.status_code == 201, r.text
                    info = svc.wait(c, r.json()["id"], timeout=180)
                    # a's day allows 50k tokens: its run's budget is cut to that, and the
                    # first answer (60k) spends it (the run ends on its budget, or just
                    # before it was killed, done).
                    want = {"budget", "succeeded"} if tenant == "a" else {"succeeded"}
                    assert info["status"] in want, (info, svc.log())
                    assert info["usage"]["provider_requests"] >= 1
                    assert info["usage"]["tokens"] > 0
                    if tenant == "b":  # 60k in at $3/M, 10 out at $15/M, per request
                        want_cost = info["usage"]["provider_requests"] * 0.18015
                        assert abs(info["usage"]["cost_usd"] - want_cost) < 1e-6, info
                        assert c.get("/v1/usage").json()["totals"]["cost_usd"] >= want_cost
                    else:
                        assert "cost_usd" not in info["usage"]  # no price, no cost (not 0)
                seen[tenant] = {q.header("x-api-key") for q in upstream.requests[n:]}
            assert seen["a"] == {env["SVC_KEY_A"]}
            assert seen["b"] == {env["SVC_KEY_B"]}
            with svc.client(key=svc.operator_key) as op:
                assert 'airlock_tenant_cost_usd_total{tenant="b"}' in op.get("/metrics").text
            # The service's own environment never carries a run's key variable.
            pid = svc.proc.pid if svc.proc else 0
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(v.startswith(b"ANTHROPIC_API_KEY=") for v in environ)
            with svc.client("c") as c:  # no key configured: the run fails, nothing leaks
                info = svc.wait(c, c.post("/v1/runs", json={
                    "agent": "builtin", "task": "x"}).json()["id"], timeout=120)
                assert info["status"] == "failed"
            with svc.client("a") as a:  # a's tokens for today are spent
                r = a.post("/v1/runs", json={"agent": "builtin", "task": "again"})
                assert r.status_code == 429 and "tokens_per_day" in r.json()["error"]


def test_a_runs_events_and_patch_come_from_the_host_that_ran_it(tmp_path: Path) -> None:
    """Two hosts, one database: either answers for a run, its log stays where it ran."""
    ws = tmp_path / "ws"
    (ws / "repo").mkdir(parents=True)
    tenants = {"acme": {"floor": "ci", "workspaces": str(ws)}}
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    a = ServiceProcess(tmp_path / "a", capacity=1, tenants=tenants, database=db, host_id="host-a")
    b = ServiceProcess(tmp_path / "b", capacity=1, tenants=tenants, database=db, host_id="host-b",
                       keys=a.keys)
    with a, b, a.client("acme") as ca, b.client("acme") as cb:
        first = ca.post("/v1/runs", json={"command": ["sh", "-c", "echo first; sleep 5"]}).json()
        second = ca.post("/v1/runs", json={
            "command": ["sh", "-c", "echo second; echo x > /workspace/made"],
            "workspace": "repo"}).json()
        one = a.wait(ca, first["id"], until={"running", "succeeded"})
        two = a.wait(ca, second["id"])
        assert two["status"] == "succeeded", two
        hosts = {rid: {h for h in ("a", "b") if (tmp_path / h / "runs" / "acme" / rid).exists()}
                 for rid in (first["id"], second["id"])}
        # One host was busy with the first run, so the other ran the second.
        assert one["id"] and len(hosts[first["id"]]) == len(hosts[second["id"]]) == 1
        assert hosts[first["id"]] != hosts[second["id"]], hosts
        for rid in (first["id"], second["id"]):
            where = "a" if (tmp_path / "a" / "runs" / "acme" / rid).exists() else "b"
            other = cb if where == "a" else ca
            with other.stream("GET", f"/v1/runs/{rid}/events", params={"format": "jsonl"}) as r:
                events = [json.loads(x) for x in r.iter_lines()]
            assert events[0]["type"] == "run.start" and events[-1]["type"] == "run.end", where
            if rid == second["id"]:
                r = other.get(f"/v1/runs/{rid}/patch")
                assert r.status_code == 200 and "+x" in r.text


# -- warm pools --------------------------------------------------------------------------


def pool_metrics(svc: ServiceProcess) -> dict[str, float]:
    with svc.client(key=svc.operator_key) as op:
        text = op.get("/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("airlock_pool_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_warm(svc: ServiceProcess, count: int = 1, timeout: float = 90) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = pool_metrics(svc)
        if m.get("airlock_pool_warm", 0) >= count:
            return m
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool has {m} after {timeout} s: {svc.log()}")
        time.sleep(0.2)


def run_events(svc: ServiceProcess, client: httpx.Client, run_id: str) -> list[dict[str, Any]]:
    info = svc.wait(client, run_id)
    assert info["status"] == "succeeded", info
    r = client.get(f"/v1/runs/{run_id}/events", params={"format": "jsonl"})
    return [json.loads(line) for line in r.text.splitlines()]


def output_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"].get("text", "") for e in events if e["type"] == "agent.output")


def sandbox_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's sandbox.created (cold) or sandbox.claimed (from the pool)."""
    found = [e for e in events if e["type"] in ("sandbox.created", "sandbox.claimed")]
    assert len(found) == 1, [e["type"] for e in events]
    return found[0]


def pooled_containers(engine: Any, svc: ServiceProcess) -> list[Any]:
    """This service's pooled containers (any state): the pool label and its owner label."""
    assert svc.proc is not None
    mine = f"{socket.gethostname()}:{svc.proc.pid}:"
    return [c for c in engine.containers.list(all=True, filters={"label": "airlock.pool"})
            if c.labels.get("airlock.owner", "").startswith(mine)]


def test_tenants_share_the_pool_and_see_nothing_of_each_other(tmp_path: Path,
                                                              engine: Any) -> None:
    from runner.policy.loader import load_policy

    secret = "pool-secret-" + os.urandom(8).hex()
    acme_floor = floor_file(tmp_path, "floor-acme", "extends: default\nenv:\n  allow: [POOLTEST_A]\n")
    svc = ServiceProcess(tmp_path, capacity=2, env={"POOLTEST_A": secret}, tenants={
        "acme": {"floor": acme_floor}, "globex": {"floor": "default"}},
        extra={"pools": {"max_total": 2, "learned": {"per_boundary": 1}}})
    writes = ('echo "A=$POOLTEST_A"; echo a > /tmp/mark-a && echo a > "$HOME/mark-a" '
              '&& echo wrote')
    looks = ('env; for f in /tmp/mark-a "$HOME/mark-a"; do '
             'if [ -e "$f" ]; then echo "SEEN $f"; else echo "ABSENT $f"; fi; done')
    with svc, svc.client("acme") as acme, svc.client("globex") as globex:
        first = run_events(svc, acme, acme.post("/v1/runs", json={
            "command": ["echo", "first"]}).json()["id"])
        assert sandbox_event(first)["type"] == "sandbox.created"  # nothing learned yet: cold
        wait_warm(svc)
        a = run_events(svc, acme, acme.post("/v1/runs", json={
            "command": ["sh", "-c", writes]}).json()["id"])
        claimed_a = sandbox_event(a)
        assert claimed_a["type"] == "sandbox.claimed", claimed_a
        assert f"A={secret}" in output_of(a) and "wrote" in output_of(a)  # delivered at claim

        # globex never ran before: the sandbox it gets was warmed for acme's boundary.
        m = wait_warm(svc)
        assert m["airlock_pool_memory_bound_bytes"] == (
            m["airlock_pool_warm"] * load_policy("default").policy.resources.memory)
        b = run_events(svc, globex, globex.post("/v1/runs", json={
            "command": ["sh", "-c", looks]}).json()["id"])
        claimed_b = sandbox_event(b)
        assert claimed_b["type"] == "sandbox.claimed", claimed_b
        assert claimed_b["data"]["container"] != claimed_a["data"]["container"]
        assert claimed_b["data"]["pool"] != claimed_a["data"]["pool"]
        seen = output_of(b)
        assert "ABSENT /tmp/mark-a" in seen and "ABSENT /home/airlock/mark-a" in seen, seen
        assert "SEEN" not in seen and secret not in seen and "POOLTEST" not in seen, seen
        assert "HOME=/home/airlock" in seen  # the env listing ran

        m = pool_metrics(svc)
        assert m["airlock_pool_claims_total"] == 2 and m["airlock_pool_misses_total"] == 1, m
        assert m["airlock_pool_max_sandboxes"] == 2 and m["airlock_pool_boundaries"] == 1, m
        wait_warm(svc)
        assert pooled_containers(engine, svc)  # warm ones, this service's
        code = svc.stop()
        assert code == 0, svc.log()
        left = pooled_containers(engine, svc)
        assert left == [], [(c.name, c.status) for c in left]


def test_a_fixed_pool_is_warm_from_the_start_and_learns_nothing(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path, capacity=1, tenants={"acme": {"floor": "default"}},
                         extra={"pools": {"max_total": 1,
                                          "fixed": [{"policy": "default", "size": 1}]}})
    with svc, svc.client("acme") as acme:
        wait_warm(svc)
        pooled = run_events(svc, acme, acme.post("/v1/runs", json={
            "command": ["true"]}).json()["id"])
        assert sandbox_event(pooled)["type"] == "sandbox.claimed"
        # A tighter boundary than the fixed one: not pooled, and not learned either.
        cold = run_events(svc, acme, acme.post("/v1/runs", json={
            "command": ["true"], "policy": {"resources": {"memory": "256m"}}}).json()["id"])
        assert sandbox_event(cold)["type"] == "sandbox.created"
        m = wait_warm(svc)
        assert m["airlock_pool_claims_total"] == 1 and m["airlock_pool_misses_total"] == 1, m
        assert m["airlock_pool_boundaries"] == 1 and m["airlock_pool_warm"] == 1, m


def test_a_fixed_pool_at_a_floor_serves_two_tenants_their_own_keys(tmp_path: Path) -> None:
    """A fixed entry names the tenants' floor file and the builtin agent: under gVisor,
    both tenants' runs claim from it, and each run's gateway carries its own tenant's
    key (what is per run arrives at the claim, nothing of it at warm-up)."""
    with ScriptedProvider([{"text": "done", "usage": {"input_tokens": 5, "output_tokens": 1}}],
                          loop=True) as upstream:
        floor = strict_floor(tmp_path, upstream.url)
        env = {"SVC_KEY_A": "sk-tenant-a-" + "a" * 24, "SVC_KEY_B": "sk-tenant-b-" + "b" * 24}
        svc = ServiceProcess(tmp_path, capacity=2, env=env, tenants={
            "a": {"floor": floor, "provider_keys": {"ANTHROPIC_API_KEY": "SVC_KEY_A"}},
            "b": {"floor": floor, "provider_keys": {"ANTHROPIC_API_KEY": "SVC_KEY_B"}},
        }, extra={"pools": {"max_total": 2, "fixed": [
            {"policy": floor, "agent": "builtin", "size": 2}]}})
        with svc:
            wait_warm(svc, 2, timeout=180)
            seen: dict[str, set[str | None]] = {}
            containers = set()
            for tenant in ("a", "b"):
                n = len(upstream.requests)
                with svc.client(tenant) as c:
                    run_id = c.post("/v1/runs", json={"agent": "builtin", "task": "say done",
                                                      "model": "default"}).json()["id"]
                    claimed = sandbox_event(run_events(svc, c, run_id))
                assert claimed["type"] == "sandbox.claimed", claimed
                assert claimed["data"]["runtime"] == "runsc"
                containers.add(claimed["data"]["container"])
                seen[tenant] = {q.header("x-api-key") for q in upstream.requests[n:]}
            assert seen == {"a": {env["SVC_KEY_A"]}, "b": {env["SVC_KEY_B"]}}
            assert len(containers) == 2
            m = pool_metrics(svc)
            assert m["airlock_pool_claims_total"] == 2 and m["airlock_pool_misses_total"] == 0


def test_a_killed_hosts_warm_sandboxes_are_removed_when_it_starts_again(tmp_path: Path,
                                                                       engine: Any) -> None:
    pools = {"pools": {"max_total": 1, "fixed": [{"policy": "default", "size": 1}]}}
    first = ServiceProcess(tmp_path, tenants={"acme": {"floor": "default"}}, extra=pools)
    with first:
        wait_warm(first)
        warm = pooled_containers(engine, first)
        assert warm
        first.stop(signal.SIGKILL)
    assert {c.id for c in pooled_containers(engine, first)} == {c.id for c in warm}  # left
    again = ServiceProcess(tmp_path, tenants={"acme": {"floor": "default"}})  # no pools now
    with again:
        assert pooled_containers(engine, first) == []
        assert "removed 1 warm sandbox(es) this host's last process left" in again.log()
    for c in warm:
        assert not Path(c.labels["airlock.scratch"]).exists()


def test_a_bad_pools_section_is_refused_in_one_line(tmp_path: Path) -> None:
    from runner.errors import PolicyError
    from runner.service.config import load_config

    head = "listen: 127.0.0.1:8470\ntenants:\n  acme:\n    api_key_sha256: '" + "a" * 64 + "'\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(head + "pools:\n  max_total: 2\n  fixed:\n"
                   "    - {policy: default, size: 1, agnet: codex}\n")
    out = subprocess.run([sys.executable, "-m", "runner.cli", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"{bad}:8: pools.fixed.0.agnet: unknown key (did you mean 'agent'?); allowed: "
        "policy, agent, image, workspace, size"], out.stderr
    cases = {
        "pools: {max_total: 2, fixed: [{policy: default, size: 3}]}":
            "7: pools: fixed: the sizes add up to 3, more than max_total (2)",
        "pools: {learned: {per_boundary: 1}, fixed: [{policy: default, size: 1}]}":
            "7: pools: give either `learned` or `fixed` sizing, not both",
        "pools: {max_total: 0}": "7: pools.max_total: Input should be greater than or equal to 1",
        "pools: {fixed: [{policy: default, size: 1, workspace: copy}]}":
            "7: pools.fixed.0.policy: its workspace mode is ro, so no run of it has a pooled "
            "copy workspace",
        "pools: {fixed: [{policy: strict, agent: builtin, image: base, size: 1}]}":
            "7: pools.fixed.0: image: only the command agent takes an image",
    }
    for text, message in cases.items():
        bad.write_text(head + "\n\n" + text + "\n")
        with pytest.raises(PolicyError) as refused:
            load_config(bad)
        assert refused.value.problems == [f"{bad}:{message}"], text
    bad.write_text(head + "pools: {enabled: false, max_total: 3}\n")
    assert load_config(bad).pools is None
    bad.write_text(head + "pools: {max_total: 3}\n")
    pools = load_config(bad).pools
    assert pools is not None and pools.per_boundary == 2 and pools.fixed == []


# -- SIGTERM -----------------------------------------------------------------------------


def test_sigterm_drains_and_keeps_every_record(tmp_path: Path) -> None:
    svc = ServiceProcess(tmp_path, capacity=2, tenants={"acme": {"floor": "default"}},
                         extra={"shutdown_grace": "4s"})
    with svc, svc.client("acme") as c:
        short = c.post("/v1/runs", json={"command": ["sleep", "2"]}).json()["id"]
        long = c.post("/v1/runs", json={"command": ["sleep", "300"]}).json()["id"]
        queued = c.post("/v1/runs", json={"command": ["true"]}).json()["id"]
        svc.wait(c, long, until={"running"}, timeout=60)
        svc.wait(c, short, until={"running"}, timeout=60)
        t0 = time.monotonic()
        assert svc.proc is not None
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        r = c.post("/v1/runs", json={"command": ["true"]})
        assert r.status_code == 503 and r.headers.get("retry-after")
        assert c.get("/healthz").json()["status"] == "draining"
        code = svc.proc.wait(60)
        took = time.monotonic() - t0
    assert code == 0, svc.log()
    assert took < 4 + 30, took
    db = sqlite3.connect(tmp_path / "airlock.db")
    rows = dict(db.execute("select id, status from runs").fetchall())
    assert rows[short] == "succeeded"
    assert rows[long] == "cancelled"
    assert rows[queued] == "queued"  # for the next start, or another host
    for run_id in (short, long):
        log = tmp_path / "runs" / "acme" / run_id / "events.jsonl"
        assert verify_log(log, run_id=run_id) == []
        assert json.loads(log.read_text().splitlines()[-1])["type"] == "run.end"


# -- the config --------------------------------------------------------------------------


def test_a_config_with_an_unknown_key_exits_2_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:0\ntenants:\n  acme:\n    api_key_sha256: '" + "a" * 64 +
                   "'\n    flor: strict\n")
    out = subprocess.run([sys.executable, "-m", "runner.cli", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{bad}:5: tenants.acme.flor: unknown key (did you mean 'floor'?)" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_readme_config_example_loads_as_written(tmp_path: Path) -> None:
    """README "Running Airlock for many tenants": the two YAML blocks, as printed."""
    from runner.service.config import load_config
    from runner.service.floors import Refused, apply_on_floor

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Running Airlock for many tenants", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```yaml\n")[1:]]
    files = {b.splitlines()[0].removeprefix("# ").split(":")[0]: b for b in blocks}
    assert set(files) == {"airlock.yaml", "floors/acme.yaml"}, list(files)
    (tmp_path / "floors").mkdir()
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    config = load_config(tmp_path / "airlock.yaml")
    assert config.listen == "127.0.0.1:8470" and config.capacity == 8
    assert config.database == "sqlite:///var/lib/airlock/airlock.db"
    assert config.pools is not None and config.pools.max_total == 4
    assert config.pools.per_boundary == 0  # fixed sizing learns nothing
    assert [(f.agent, f.size) for f in config.pools.fixed] == [("builtin", 2), ("command", 1)]
    assert config.pools.fixed[0].policy.provider is not None  # acme's floor, as its runs get it
    acme, globex = config.tenants["acme"], config.tenants["globex"]
    assert acme.weight == 2 and acme.quota.tokens_per_day == 5_000_000
    assert acme.floor.process.runtime == "runsc" and acme.floor.provider is not None
    assert acme.provider_keys == {"ANTHROPIC_API_KEY": "ACME_ANTHROPIC_KEY"}
    assert apply_on_floor(acme, {"resources": {"memory": "256m"}}).resources.memory == 256 << 20
    with pytest.raises(Refused) as refused:
        apply_on_floor(globex, {"provider": {"backend": "anthropic"}})
    assert refused.value.status == 403


def test_the_meter_counts_only_authoritative_events() -> None:
    """Usage from the gateway, MCP server and proxy; the agent's own claims count nothing."""
    from runner.events.log import EventLog
    from runner.service.accounting import RunMeter

    log = EventLog(None, "r1")
    meter = RunMeter(engine=None)
    log.subscribe(meter)
    log.emit("provider.request", "gateway", input_tokens=100, output_tokens=20, bytes_in=10,
             bytes_out=30)
    log.emit("provider.request", "gateway", input_tokens=None, output_tokens=None)
    log.emit("mcp.call", "mcp", tool="x")
    log.emit("proxy.closed", "proxy", bytes_up=1000, bytes_down=5000)
    log.emit("provider.request", "agent", input_tokens=10**9, output_tokens=10**9)
    log.emit("mcp.call", "agent", tool="fake")
    c = meter.counters(wall_seconds=2.5)
    assert c["provider_requests"] == 2 and c["tokens"] == 120
    assert c["input_tokens"] == 100 and c["output_tokens"] == 20
    assert c["mcp_calls"] == 1 and c["egress_bytes"] == 6000 and c["provider_bytes"] == 40
    assert c["wall_seconds"] == 2.5


# -- the HTTP connection itself (anyone who can connect, before any key) -----------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_huge_request_head_is_refused_before_it_is_held(shared: ServiceProcess) -> None:
    """Before: uvicorn picked httptools, whose head has no cap: one connection sending a
    184 MB URL grew the service by 280 MB."""
    import socket

    assert shared.proc is not None
    before = _rss_kib(shared.proc.pid)
    for start in (b"GET /healthz?", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: "):
        with socket.create_connection(("127.0.0.1", shared.port), timeout=30) as s:
            s.sendall(start)
            sent = 0
            with contextlib.suppress(OSError):
                while sent < 64 << 20:
                    s.sendall(b"a" * (1 << 16))
                    sent += 1 << 16
            assert sent < 4 << 20, "the service kept reading a head past 4 MiB"
    assert _rss_kib(shared.proc.pid) - before < 32 << 10
    assert httpx.get(f"{shared.url}/healthz", timeout=10).status_code == 200


def _serve_bounded(request_timeout: float, connections: int) -> tuple[Any, int, Any]:
    """The service's protocol on uvicorn, in this process, in front of a small app that
    reads bodies and streams a slow response (as the event stream does)."""
    import asyncio
    import threading

    import uvicorn

    from runner.service.http_limits import HEAD_BYTES, protocol_class
    from runner.testing.service import free_port

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/slow":  # a stream longer than the request deadline
            for _ in range(4):
                await asyncio.sleep(request_timeout)
                await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"ok\n"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
        http=protocol_class(request_timeout, connections),
        h11_max_incomplete_event_size=HEAD_BYTES))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 10)
    return server, port, thread


def _read_all(s: Any, timeout: float) -> tuple[bytes, float]:
    s.settimeout(timeout)
    t0 = time.monotonic()
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(4096):
            data += chunk
    return data, time.monotonic() - t0


def test_stalled_requests_are_cut_and_connections_capped() -> None:
    """Before: a connection that sent half a head, or a body one byte short, was held
    for ever (3,000 of them still held after 60 s, each a descriptor and up to 1 MiB)."""
    import socket

    server, port, thread = _serve_bounded(request_timeout=1.0, connections=8)
    try:
        def conn() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), timeout=10)

        silent, half_head, short_body, streaming = conn(), conn(), conn(), conn()
        half_head.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        short_body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 99)
        streaming.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in (silent, half_head, short_body):
            data, took = _read_all(s, 10)
            assert data.startswith(b"HTTP/1.1 408"), data
            assert took < 5
        data, took = _read_all(streaming, 15)  # its request was whole: never cut
        assert data.count(b"tick") == 4 and data.endswith(b"ok\n\r\n0\r\n\r\n"), data
        for s in (silent, half_head, short_body, streaming):
            s.close()

        held = [conn() for _ in range(8)]
        extra = conn()
        assert _read_all(extra, 5)[0] == b""  # closed as it was accepted
        extra.close()
        for s in held:
            s.close()
        time.sleep(0.3)
        with conn() as again:  # the slots came back
            again.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b"ok\n" in _read_all(again, 5)[0]
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_tenant_holds_a_bounded_number_of_event_streams(shared: ServiceProcess) -> None:
    """Before: 400 streams of one tenant took 1.1 cores and slowed another tenant's
    `GET /v1/runs/{id}` from 1.5 ms to 390 ms; now past MAX_STREAMS it is 429."""
    import asyncio

    from runner.service.app import MAX_STREAMS

    with shared.client("acme") as acme, shared.client("globex") as globex:
        run_id = acme.post("/v1/runs", json={"command": ["sleep", "60"]}).json()["id"]
        other = globex.post("/v1/runs", json={"command": ["sleep", "60"]}).json()["id"]
        statuses: list[int] = []

        async def follow(client: httpx.AsyncClient, opened: asyncio.Event) -> None:
            async with client.stream("GET", f"/v1/runs/{run_id}/events") as r:
                statuses.append(r.status_code)
                opened.set()
                if r.status_code == 200:
                    async for _ in r.aiter_raw():
                        pass

        async def main() -> None:
            async with httpx.AsyncClient(
                    base_url=shared.url, timeout=None,
                    headers={"Authorization": f"Bearer {shared.keys['acme']}"},
                    limits=httpx.Limits(max_connections=MAX_STREAMS + 20)) as client:
                events = [asyncio.Event() for _ in range(MAX_STREAMS + 8)]
                tasks = [asyncio.create_task(follow(client, e)) for e in events]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                assert statuses.count(200) == MAX_STREAMS and statuses.count(429) == 8
                # another tenant's stream is its own to open
                async with httpx.AsyncClient(
                        base_url=shared.url, timeout=30,
                        headers={"Authorization": f"Bearer {shared.keys['globex']}"}) as g, \
                        g.stream("GET", f"/v1/runs/{other}/events") as r:
                    assert r.status_code == 200
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())
        acme.post(f"/v1/runs/{run_id}/cancel")
        globex.post(f"/v1/runs/{other}/cancel")
        # every slot came back, however its stream ended
        assert wait_for(lambda: acme.get(f"/v1/runs/{run_id}/events?format=jsonl")
                        .status_code == 200, 30)
