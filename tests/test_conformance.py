"""`airlock conformance`: the escape suite holds on both runtimes, and can fail.

- The catalog: at least 40 attacks over the six categories, each with an in-sandbox
  check and at least one weakened counterpart (fast, no engine).
- The suite under the strict preset on runsc and the default preset on runc: no attack
  escapes (beyond the known findings listed below, which the suite reports as ESCAPED
  and `airlock conformance` exits 1 for).
- Every weakened counterpart (runner/conformance/weakened.py): the attacks it targets
  report "escaped". That is the proof that each check catches what it targets.

NETWORK RULE: every attack aims at this machine only (see runner/conformance/probe.py).
"""

from __future__ import annotations

import io
import json
import warnings

import pytest

from runner.conformance import ATTACKS, BY_ID, Suite, SuiteReport
from runner.conformance.attacks import BATCHES
from runner.conformance.probe import CHECKS
from runner.conformance.runner import AttackResult
from runner.conformance.table import plain, print_report
from runner.conformance.weakened import WEAKENINGS, for_attack
from runner.policy.loader import load_policy

# Findings the suite made, each fixed since (kept here as the record of what it caught):
# - runc, priv.ptrace: Docker's init ran as the sandbox user and dumpable, so the agent
#   could open /proc/1/mem read-write (ptrace denied, that route not); the shim is PID 1
#   now (68730f8).
# - runsc, fs.mknod: gVisor let uid 1000 mknod character devices on its tmpfs and open
#   them (/dev/net/tun, /dev/fuse; nodev not honoured); seccomp now refuses device nodes
#   to mknod/mknodat (024b9f2).
# - both, res.output-flood: the budget kill ran on the output pump's thread, nobody
#   drained the attach stream meanwhile, the container blocked on its stdout and
#   `docker kill` hung; kills run on their own thread now (7e766cd).
# An entry here (runtime -> attack ids) would let a known, reported escape through
# while it is being fixed; the test warns once it no longer escapes.
KNOWN_ESCAPES: dict[str, set[str]] = {}

CATEGORIES = {"network", "filesystem", "privilege", "resources", "secrets", "log"}


# -- the catalog (no engine) ----------------------------------------------------------------


def test_catalog_has_forty_attacks_over_every_category():
    assert len(ATTACKS) >= 40
    assert len({a.id for a in ATTACKS}) == len(ATTACKS)
    assert {a.category for a in ATTACKS} == CATEGORIES
    for a in ATTACKS:
        assert a.tries and a.expected, a.id
        assert a.batch in BATCHES, a.id


def test_every_attack_has_an_in_sandbox_check():
    assert set(CHECKS) == set(BY_ID)


def test_every_attack_has_a_weakened_counterpart():
    for a in ATTACKS:
        assert for_attack(a.id), f"{a.id} has no weakened policy or setting"
    for w in WEAKENINGS:
        assert set(w.targets) <= set(BY_ID), w.name
        assert set(w.targets_for("runsc")) <= set(w.targets), w.name
        assert w.kind in ("policy", "setting", "policy+setting"), w.name
        assert set(w.runtimes) <= {"runc", "runsc"}, w.name


def test_every_attack_escapes_under_some_weakening_on_runc():
    covered = {t for w in WEAKENINGS if "runc" in w.runtimes for t in w.targets_for("runc")}
    assert covered == set(BY_ID)


def _report(verdicts: dict[str, str]) -> SuiteReport:
    results = [AttackResult(a, BY_ID[a].category, BY_ID[a].tries, BY_ID[a].expected,
                            f"observed {v}", v, BY_ID[a].batch) for a, v in verdicts.items()]
    return SuiteReport("strict", "runsc", results, 1.0)


def test_exit_code_and_rendering():
    ok = _report({"net.interfaces": "blocked", "priv.bpf": "blocked"})
    assert ok.exit_code == 0
    bad = _report({"net.interfaces": "blocked", "priv.bpf": "escaped"})
    assert bad.exit_code == 1 and [r.id for r in bad.escaped] == ["priv.bpf"]
    assert _report({"net.interfaces": "error"}).exit_code == 1
    text = plain(bad, width=140)
    assert "priv.bpf" in text and "ESCAPED" in text and "1 escaped" in text
    buf = io.StringIO()
    print_report(bad, json_out=True, out=buf)
    data = json.loads(buf.getvalue())
    assert data["summary"] == {"attacks": 2, "blocked": 1, "escaped": 1, "errors": 0}
    assert {r["id"] for r in data["results"]} == {"net.interfaces", "priv.bpf"}


# -- against the real engine --------------------------------------------------------------

SUITES = [pytest.param("strict", "runsc", id="strict-runsc"),
          pytest.param("strict", "runsc-ptrace", id="strict-runsc-ptrace"),
          pytest.param("default", "runc", id="default-runc")]


def _check_no_escape(report: SuiteReport) -> None:
    table = plain(report, width=200)
    assert not report.errors, table
    escaped = {r.id for r in report.escaped}
    known = KNOWN_ESCAPES.get(report.runtime, set())
    assert escaped <= known, f"new escapes {sorted(escaped - known)}\n{table}"
    fixed = known - escaped
    if fixed:
        warnings.warn(f"known findings no longer escape on {report.runtime}: {sorted(fixed)}; "
                      "remove them from KNOWN_ESCAPES", stacklevel=2)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "runtime"), SUITES)
def test_suite_blocks_every_attack(engine, preset, runtime):
    if runtime == "runsc-ptrace" and runtime not in engine.info().get("Runtimes", {}):
        pytest.skip(f"the engine has no runtime {runtime}")  # `make engine` registers it
    report = Suite(load_policy(preset).policy, runtime=runtime).run()
    assert report.runtime == runtime
    assert len(report.results) == len(ATTACKS)
    _check_no_escape(report)
    assert report.duration_s < 150, report.runs


def _weakened_cases() -> list[pytest.ParameterSet]:
    cases = []
    for w in WEAKENINGS:
        for preset, runtime in (("default", "runc"), ("strict", "runsc")):
            if runtime in w.runtimes:
                cases.append(pytest.param(w, preset, runtime, id=f"{w.name}-{runtime}"))
        if w.runtimes == ("runsc",):  # gVisor-only findings: the suite can fail on ptrace too
            cases.append(pytest.param(w, "strict", "runsc-ptrace", id=f"{w.name}-runsc-ptrace"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("weakening", "preset", "runtime"), _weakened_cases())
def test_weakened_counterpart_reports_the_escape(engine, weakening, preset, runtime):
    if runtime == "runsc-ptrace" and runtime not in engine.info().get("Runtimes", {}):
        pytest.skip(f"the engine has no runtime {runtime}")  # `make engine` registers it
    targets = list(weakening.targets_for("runsc" if runtime.startswith("runsc") else runtime))
    report = Suite(load_policy(preset).policy, runtime=runtime,
                   weakening=weakening).run(targets)
    verdicts = {r.id: r.verdict for r in report.results}
    assert set(verdicts) == set(targets)
    missed = {a: v for a, v in verdicts.items() if v != "escaped"}
    assert not missed, f"{weakening.name} ({weakening.how}):\n{plain(report, width=200)}"


@pytest.mark.slow
def test_cli_prints_json_and_exits_zero(airlock, engine):
    r = airlock("conformance", "--policy", "default", "--runtime", "runc",
                "--only", "net.interfaces", "--only", "priv.capabilities", "--json")
    assert r.code == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert {x["id"] for x in data["results"]} == {"net.interfaces", "priv.capabilities"}
    assert data["summary"]["blocked"] == 2
