"""gVisor on its ptrace platform: a policy choice that keeps the runsc boundary.

Under systrap (gVisor's default) an idle sandbox keeps ~2.5 % of a core busy (its
fast-path controller wakes every 400 µs); ptrace does not, at the price of slower system
calls. The policy says which; the engine runs it as a
second registration of runsc ("runsc-ptrace"), since an engine passes one fixed set of
flags per runtime name. The escape suite runs on it too (test_conformance).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from runner.agents import get_agent
from runner.engines.base import LABEL_RUN
from runner.errors import BadInput
from runner.images.build import image_tag
from runner.policy.compile import GVISOR_PTRACE_RUNTIME, SandboxInputs, container_spec, engine_runtime
from runner.policy.floor import widenings_over
from runner.policy.loader import load_policy, policy_from_dict
from runner.run.launch import apply_overrides
from runner.run.orchestrator import Run, RunOptions


def _policy(**process: object):
    base = load_policy("default").policy.model_dump(mode="json")
    base["process"].update(process)
    base["extends"] = None
    return policy_from_dict(base)


def test_systrap_is_the_default_and_maps_to_runsc():
    p = _policy(runtime="runsc")
    assert p.process.gvisor_platform == "systrap"
    assert engine_runtime(p) == "runsc"


def test_ptrace_maps_to_its_own_engine_runtime_and_seccomp_stays_runscs():
    p = _policy(runtime="runsc", gvisor_platform="ptrace")
    spec = container_spec(p, SandboxInputs(image="x", run_id="r", owner="o"))
    assert spec.runtime == GVISOR_PTRACE_RUNTIME
    # the Sentry filters under --oci-seccomp on either platform: the same profile as runsc's
    same = container_spec(_policy(runtime="runsc"), SandboxInputs(image="x", run_id="r", owner="o"))
    assert spec.seccomp_profile == same.seccomp_profile


def test_platform_is_ignored_under_runc():
    assert engine_runtime(_policy(runtime="runc", gvisor_platform="ptrace")) == "runc"


def test_unknown_platform_is_a_precise_error():
    with pytest.raises(Exception) as info:
        _policy(runtime="runsc", gvisor_platform="kvm")
    assert "gvisor_platform" in str(info.value)
    assert "systrap" in str(info.value) and "ptrace" in str(info.value)


def test_runtime_flag_takes_the_engine_name():
    base = load_policy("default").policy
    p = apply_overrides(base, provider=None, runtime="runsc-ptrace", mcp_tools=[],
                        mcp_servers=[], enable_tools=[])
    assert (p.process.runtime, p.process.gvisor_platform) == ("runsc", "ptrace")
    with pytest.raises(BadInput, match="--runtime kvm: not one of runc, runsc or runsc-ptrace"):
        apply_overrides(base, provider=None, runtime="kvm", mcp_tools=[], mcp_servers=[],
                        enable_tools=[])


def test_a_floor_demanding_runsc_accepts_either_platform():
    floor = _policy(runtime="runsc")
    assert not widenings_over(floor, _policy(runtime="runsc", gvisor_platform="ptrace"))
    assert [w.key for w in widenings_over(floor, _policy(runtime="runc"))] == ["process.runtime"]


def _cmdlines() -> list[list[str]]:
    out = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            out.append((proc / "cmdline").read_bytes().decode(errors="replace").split("\0"))
    return out


# -- against the real engine ---------------------------------------------------------------


@pytest.fixture
def ptrace_engine(engine):
    if GVISOR_PTRACE_RUNTIME not in engine.info().get("Runtimes", {}):
        pytest.skip(f"the engine has no runtime {GVISOR_PTRACE_RUNTIME} (`make engine` registers it)")
    return engine


def test_a_run_on_ptrace_is_gvisor_passes_its_selftest_and_says_so(airlock, ptrace_engine):
    r = airlock("run", "--runtime", "runsc-ptrace", "--", "cat", "/proc/version")
    assert r.code == 0, r.stdout + r.stderr
    assert r.report["status"] == "succeeded"
    assert "gVisor" in r.stdout or "4.4.0" in r.stdout, r.stdout
    events = r.events()
    start = next(e["data"] for e in events if e["type"] == "run.start")
    assert (start["runtime"], start["gvisor_platform"]) == ("runsc", "ptrace")
    sandbox = next(e["data"] for e in events
                   if e["type"] in ("sandbox.created", "sandbox.claimed"))
    assert sandbox["runtime"] == GVISOR_PTRACE_RUNTIME
    selftest = next(e["data"] for e in events if e["type"] == "selftest")
    assert selftest["ok"] and selftest["runtime"] == "runsc", selftest


def test_the_sandbox_runs_on_the_ptrace_platform(ptrace_engine, tmp_path):
    """Seen from the host: the engine started gVisor's sandbox with --platform=ptrace."""
    policy = _policy(runtime="runsc", gvisor_platform="ptrace")
    run = Run(RunOptions(policy=policy, agent=get_agent("command"), task=["sleep", "60"],
                         runs_dir=tmp_path))
    runner = threading.Thread(target=run.execute, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        found: list = []
        while not found and time.monotonic() < deadline:
            found = ptrace_engine.containers.list(filters={"label": f"{LABEL_RUN}={run.run_id}"})
            time.sleep(0.2)
        assert found, "no sandbox started"
        assert found[0].attrs["HostConfig"]["Runtime"] == GVISOR_PTRACE_RUNTIME
        boots = [argv for argv in _cmdlines()
                 if argv[:1] == ["runsc-sandbox"] and any(found[0].id in a for a in argv)]
        assert boots, "no runsc-sandbox process for the sandbox"
        assert all("--platform=ptrace" in argv for argv in boots), boots
    finally:
        run.cancel()
        runner.join(60)
    assert not runner.is_alive()


def test_an_engine_without_the_runtime_says_how_to_fix_it(engine):
    """A user's engine that never registered runsc-ptrace: exit 3 with both ways out."""
    from runner.engines.docker_engine import DockerEngine
    from runner.errors import NotReady

    spec = container_spec(_policy(runtime="runsc", gvisor_platform="ptrace"),
                          SandboxInputs(image=image_tag("base"), run_id="r", owner="o"))
    spec.runtime = "runsc-ptrace-absent"
    with pytest.raises(NotReady) as info:
        DockerEngine().create(spec)
    assert "runsc-ptrace-absent" in str(info.value)
    assert "make engine" in (info.value.hint or "")


def test_runtime_runsc_means_gvisors_default_platform():
    ptrace = _policy(runtime="runsc", gvisor_platform="ptrace")
    p = apply_overrides(ptrace, provider=None, runtime="runsc", mcp_tools=[], mcp_servers=[],
                        enable_tools=[])
    assert engine_runtime(p) == "runsc"


def test_the_service_binds_the_platform_to_its_floor():
    """A dense host's operator chose ptrace: a tenant cannot switch its runs back to
    systrap (each idle one would hold ~2.5 % of a shared core), nor the reverse."""
    from runner.service.config import Quota, TenantConfig
    from runner.service.floors import Refused, apply_on_floor

    def tenant_on(floor, ref):
        return TenantConfig(name=ref, key_sha256="0" * 64, floor=floor, floor_ref=ref, weight=1,
                            quota=Quota(), provider_keys={}, workspaces=None)

    tenant = tenant_on(_policy(runtime="runsc", gvisor_platform="ptrace"), "dense")
    assert engine_runtime(apply_on_floor(tenant, None)) == GVISOR_PTRACE_RUNTIME
    assert engine_runtime(apply_on_floor(tenant, {"resources": {"memory": "256m"}})) \
        == GVISOR_PTRACE_RUNTIME
    with pytest.raises(Refused) as info:
        apply_on_floor(tenant, {"process": {"gvisor_platform": "systrap"}})
    assert info.value.status == 403 and "process.gvisor_platform" in str(info.value)
    systrap = tenant_on(_policy(runtime="runc"), "default")
    with pytest.raises(Refused):
        apply_on_floor(systrap, {"process": {"runtime": "runsc", "gvisor_platform": "ptrace"}})
    assert engine_runtime(apply_on_floor(systrap, {"process": {"runtime": "runsc"}})) == "runsc"


def _service_config(tmp_path: Path, *, pools: str = "", dense: bool = True) -> Path:
    (tmp_path / "dense.yaml").write_text(
        "extends: strict\nprocess: {runtime: runsc, gvisor_platform: ptrace}\n")
    path = tmp_path / "service.yaml"
    path.write_text("listen: 127.0.0.1:8470\ntenants:\n"
                    + ("  acme:\n    api_key_sha256: '" + "a" * 64 + "'\n    floor: dense.yaml\n"
                       if dense else "")
                    + "  zeta:\n    api_key_sha256: '" + "b" * 64 + "'\n    floor: default\n"
                    + pools)
    return path


_FULL = ["--network=none", "--host-uds=open", "--oci-seccomp"]
_WHOLE = {"runc": [], "runsc": _FULL, GVISOR_PTRACE_RUNTIME: [*_FULL, "--platform=ptrace"]}


def _check(config, runtimes: dict[str, list[str]]) -> list[str]:
    from runner.engines.gvisor_flags import registration_problem
    from runner.service.preflight import check_runtimes

    return check_runtimes(config, runtimes, lambda rt: registration_problem(rt, runtimes[rt]))


def test_the_service_refuses_to_start_without_a_runtime_a_floor_needs(tmp_path):
    """Found at start, not one refused run at a time: each missing runtime, who needs it,
    and how to register it (exit 3)."""
    from runner.errors import NotReady
    from runner.service.config import load_config

    config = load_config(_service_config(
        tmp_path, pools="pools:\n  max_total: 2\n  fixed:\n    - {policy: strict, size: 1}\n"))
    assert _check(config, _WHOLE) == []
    with pytest.raises(NotReady) as info:
        _check(config, {"runc": [], "runsc": _FULL})
    assert info.value.exit_code == 3
    assert "the engine has no runtime runsc-ptrace (needed by tenant acme)" in info.value.message
    assert "zeta" not in info.value.message
    assert "--platform=ptrace" in (info.value.hint or "")
    with pytest.raises(NotReady) as info:
        _check(config, {"runc": []})
    assert "no runtime runsc (needed by pools.fixed strict (command))" in info.value.message
    assert "no runtime runsc-ptrace (needed by tenant acme)" in info.value.message
    assert "--oci-seccomp" in (info.value.hint or "")


def test_the_service_refuses_a_gvisor_runtime_registered_without_the_boundarys_flags(tmp_path):
    from runner.errors import NotReady
    from runner.service.config import load_config

    config = load_config(_service_config(tmp_path))
    # the last value wins in runsc's flag parsing: this one runs with no seccomp filter
    weak = [*_FULL, "--platform=ptrace", "--oci-seccomp=false"]
    with pytest.raises(NotReady) as info:
        _check(config, {**_WHOLE, GVISOR_PTRACE_RUNTIME: weak})
    assert ("the engine's runtime runsc-ptrace: it is registered without --oci-seccomp "
            "(reached by tenant acme)") in info.value.message
    assert "add --oci-seccomp at the end of the runsc-ptrace runtimeArgs" in info.value.hint
    # zeta's floor is runc: its runs may narrow to runsc, so a weak runsc is refused too
    with pytest.raises(NotReady) as info:
        _check(config, {**_WHOLE, "runsc": ["--network=host", "--host-uds=open",
                                            "--oci-seccomp"]})
    assert "runsc: it is registered without --network=none (reached by tenant zeta)" \
        in info.value.message
    # dockerd joins runtimeArgs with spaces for /bin/sh: two flags in one element
    with pytest.raises(NotReady) as info:
        _check(config, {**_WHOLE, "runsc": [*_FULL, "--debug --network=host"]})
    assert "runsc: its runtimeArgs cannot be read for sure" in info.value.message
    assert "one --name=value element" in info.value.hint


def test_a_runtime_only_a_narrowing_run_could_choose_may_be_absent(tmp_path):
    from runner.service.config import load_config

    config = load_config(_service_config(tmp_path, dense=False))
    warnings = _check(config, {"runc": []})
    assert len(warnings) == 1 and "no runtime runsc: runs of tenant zeta that choose it will " \
        "be refused" in warnings[0], warnings


def test_runsc_flags_are_read_as_runsc_reads_them():
    from runner.engines.gvisor_flags import effective_flags, missing_for_boundary

    assert effective_flags(["-network=none", "--oci-seccomp", "-oci-seccomp=False",
                            "--host-uds=all"]) == {
        "network": "none", "oci-seccomp": "false", "host-uds": "all"}
    assert missing_for_boundary("runsc", _FULL) == []
    assert missing_for_boundary("runsc", [*_FULL, "--network=host"]) == ["--network=none"]
    assert missing_for_boundary("runsc-ptrace", [*_FULL, "--platform=ptrace",
                                                 "--platform=systrap"]) == ["--platform=ptrace"]
    # annotations could then set any flag per container: it must end up off
    assert missing_for_boundary("runsc", [*_FULL, "--allow-flag-override"]) == [
        "--allow-flag-override=false"]
    assert missing_for_boundary("runsc", [*_FULL, "--allow-flag-override",
                                          "--allow-flag-override=false"]) == []


def test_runsc_flags_that_cannot_be_read_for_sure_are_refused():
    """Anything whose reading depends on which flags take a value, or on the shell that
    dockerd puts between the registration and runsc."""
    from runner.engines.gvisor_flags import UnreadableFlags, effective_flags

    for args in (["--debug-log", "--oci-seccomp"],     # a string flag takes the next element
                 ["--network", "none"],                # a value in the next element
                 ["--debug --network=host"],           # two flags once the shell splits it
                 ["--debug-log=$(id)"], ["--log='x'"], ["--network=none "],
                 ["---network=none"], ["-"], ["--"], ["--=x"], ["none"],
                 ["--oci-seccomp=maybe"]):
        with pytest.raises(UnreadableFlags):
            effective_flags(args)
    # the forms `make engine` and gVisor's docs use
    assert effective_flags([*_FULL, "--platform=ptrace", "--debug", "--debug-log=/tmp/runsc/",
                            "--strace"])["platform"] == "ptrace"


def test_the_service_starts_with_a_ptrace_floor_on_an_engine_that_has_it(tmp_path, ptrace_engine):
    from runner.testing.service import ServiceProcess

    floor = tmp_path / "dense.yaml"
    floor.write_text("extends: strict\nprocess: {runtime: runsc, gvisor_platform: ptrace}\n")
    svc = ServiceProcess(tmp_path, tenants={"acme": {"floor": str(floor)}})
    with svc, svc.client("acme") as c:
        assert c.get("/healthz").status_code == 200
    assert "no runtime" not in svc.log()


def test_the_engines_gvisor_registrations_have_every_flag_the_boundary_needs(ptrace_engine):
    """What the service's start check reads of the real engine: `make engine`'s runsc and
    runsc-ptrace lack nothing."""
    from runner.engines.docker_engine import DockerEngine

    engine = DockerEngine()
    assert engine.gvisor_problem("runsc") is None
    assert engine.gvisor_problem(GVISOR_PTRACE_RUNTIME) is None
    problem = engine.gvisor_problem("runc")  # registered with no flags: all named
    assert problem is not None and problem[0] == \
        "it is registered without --network=none --oci-seccomp --host-uds=open"


def test_the_engine_refuses_a_sandbox_on_a_weakly_registered_gvisor(ptrace_engine, monkeypatch):
    """Every front end's sandbox goes through create: a registration that lost
    --oci-seccomp (as the engine reports it) gets no sandbox, and nothing is created."""
    from runner.engines import docker_engine
    from runner.engines.docker_engine import DockerEngine
    from runner.errors import NotReady

    engine = DockerEngine()
    real = engine.client.info()
    weak = {**real, "Runtimes": {**real["Runtimes"], GVISOR_PTRACE_RUNTIME: {
        **real["Runtimes"][GVISOR_PTRACE_RUNTIME],
        "runtimeArgs": [*_FULL, "--platform=ptrace", "--oci-seccomp=false"]}}}
    monkeypatch.setattr(docker_engine, "_GVISOR_CHECKED", {})
    monkeypatch.setattr(engine.client, "info", lambda: weak)
    spec = container_spec(_policy(runtime="runsc", gvisor_platform="ptrace"),
                          SandboxInputs(image=image_tag("base"), run_id="r-weak", owner="o"))
    with pytest.raises(NotReady) as info:
        engine.create(spec)
    assert "runsc-ptrace: it is registered without --oci-seccomp" in str(info.value)
    assert ptrace_engine.containers.list(all=True, filters={"label": f"{LABEL_RUN}=r-weak"}) == []
    # the whole registration passes, and is not read again within the minute
    monkeypatch.setattr(engine.client, "info", lambda: real)
    engine._refuse_weak_gvisor(GVISOR_PTRACE_RUNTIME)
    monkeypatch.setattr(engine.client, "info", lambda: weak)
    engine._refuse_weak_gvisor(GVISOR_PTRACE_RUNTIME)
