"""What the README promises a newcomer, each tried as they would: raises above a preset are
recorded, sensitive workspaces need the policy's word, `handle.events()` replays,
`events verify` names the right line, a run survives its directory being removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import runner
from runner.errors import BadInput
from tests.conftest import AIRLOCK, ROOT, wait_for, write_policy

RAISED = "extends: strict\nprocess:\n  runtime: runc\nresources:\n  memory: 8g\n  pids: 60000\n"


def test_policy_check_lists_every_raise_above_the_preset(airlock, tmp_path):
    path = write_policy(tmp_path, RAISED)
    r = airlock("policy", "check", path)
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"{path}:3: widened above the preset strict: process.runtime: runc, wider than runsc " \
           "(narrow to wide: runsc < runc)" in lines
    assert any(ln.startswith(f"{path}:5: widened above the preset strict: resources.memory: 8g, "
                             "wider than 512m") for ln in lines), lines
    assert any(ln.startswith(f"{path}:6: ") and "resources.pids: 60000" in ln for ln in lines)
    # A policy that only tightens its preset says nothing.
    tight = write_policy(tmp_path, "extends: strict\nresources:\n  memory: 256m\n", "tight.yaml")
    r = airlock("policy", "check", tight)
    assert r.code == 0 and r.stdout == ""


def test_a_run_records_each_raise_as_policy_widened(airlock, engine, tmp_path):
    path = write_policy(tmp_path, RAISED)
    r = airlock("run", "-q", "--policy", path, "--", "true")
    assert r.code == 0, r.stderr
    widened = {e["data"].get("key"): e["data"] for e in r.events() if e["type"] == "policy.widened"}
    assert widened["resources.memory"]["preset_value"] == "512m"
    assert widened["resources.memory"]["value"] == "8g"
    assert widened["resources.memory"]["preset"] == "strict"
    assert widened["process.runtime"]["value"] == "runc"
    assert widened["resources.pids"]["value"] == 60000
    # A flag raises too: --runtime runc over strict.
    r = airlock("run", "-q", "--policy", "strict", "--runtime", "runc", "--", "true")
    assert r.code == 0, r.stderr
    assert [e["data"]["key"] for e in r.events() if e["type"] == "policy.widened"] == [
        "process.runtime"]
    # Presets themselves, unchanged, record nothing.
    r = airlock("run", "-q", "--policy", "ci", "--", "true")
    assert not [e for e in r.events() if e["type"] == "policy.widened"]


def test_the_python_api_records_raises_above_the_preset(engine, tmp_path):
    seen = []
    result = runner.execute(["true"], agent="command", runs_dir=tmp_path,
                            policy={"extends": "strict", "budgets": {"steps": 1000}},
                            on_event=seen.append)
    assert result.exit_code == 0, result.error
    (w,) = [e for e in seen if e.type == "policy.widened"]
    assert (w.data["key"], w.data["preset_value"], w.data["value"]) == ("budgets.steps", 100, 1000)


def test_sensitive_workspace_refused_even_through_a_symlink_and_allowed_by_policy(
        airlock, engine, runs_dir, tmp_path):
    link = tmp_path / "innocent"
    link.symlink_to("/proc")
    r = airlock("run", "-q", "-w", str(link), "--", "true")
    assert r.code == 2 and r.run_dir is None
    assert "host's processes (/proc)" in r.stderr
    r = airlock("run", "-q", "-w", str(runs_dir), "--", "true")
    assert r.code == 2 and "runs directory" in r.stderr
    allow = write_policy(tmp_path, "filesystem:\n  allow_sensitive_workspace: true\n")
    shared = tmp_path / "shared-runs"  # one the sandbox's uid may enter
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    r = airlock("run", "-q", "-p", allow, "-w", str(shared), "--", "true",
                env={"AIRLOCK_RUNS_DIR": str(shared)})
    assert r.code == 0, r.stderr
    (run_dir,) = shared.iterdir()
    events = [json.loads(ln) for ln in (run_dir / "events.jsonl").read_text().splitlines()]
    details = [e["data"]["detail"] for e in events if e["type"] == "policy.widened"]
    assert any(str(shared) in d and "runs directory" in d for d in details), details
    with pytest.raises(BadInput, match="host's root directory"):
        runner.execute(["true"], agent="command", workspace="/", runs_dir=tmp_path / "api")
    assert not (tmp_path / "api").exists()


def test_model_without_provider_is_refused_by_the_api(tmp_path):
    with pytest.raises(BadInput, match="no provider section"):
        runner.execute(["true"], agent="command", model="gpt-5", runs_dir=tmp_path)


def test_handle_events_replays_and_never_hangs(engine, tmp_path):
    with runner.start(["sh", "-c", "echo one; sleep 1; echo two"], agent="command",
                      runs_dir=tmp_path) as handle:
        first = [e.type for e in handle.events()]
    second: list[str] = []
    t = threading.Thread(target=lambda: second.extend(e.type for e in handle.events()))
    t.start()
    t.join(30)
    assert not t.is_alive(), "a second events() hung"
    assert first == second and first[0] == "run.start" and first[-1] == "run.end"
    assert handle.result().exit_code == 0


def test_dir_of_runner_lists_the_api():
    assert {"execute", "start", "load_policy", "Policy", "RunResult"} <= set(dir(runner))


def _run_with_log(airlock) -> Path:
    r = airlock("run", "-q", "--", "sh", "-c", "echo a; echo b")
    assert r.code == 0 and r.run_dir is not None
    return r.run_dir


def _verify(airlock, run_dir: Path) -> tuple[int, str]:
    r = airlock("events", "verify", run_dir.name)
    return r.code, r.stdout.strip()


def test_events_verify_names_the_right_line_for_each_tampering(airlock, engine):
    def tamper(change) -> tuple[int, str, int]:
        run_dir = _run_with_log(airlock)
        log = run_dir / "events.jsonl"
        lines = log.read_bytes().split(b"\n")[:-1]
        count = len(lines)
        new = change(lines)
        log.write_bytes(b"\n".join(new) + (b"\n" if new else b""))
        code, out = _verify(airlock, run_dir)
        return code, out, count

    def edit(i: int):
        def change(lines):
            event = json.loads(lines[i])
            event["ts"] = "2000-01-01T00:00:00Z"
            lines[i] = json.dumps(event, separators=(",", ":")).encode()
            return lines
        return change

    code, out, n = tamper(edit(-1))
    assert code == 1 and f"events.jsonl:{n}: line edited" in out, out
    code, out, n = tamper(edit(2))
    assert code == 1 and "events.jsonl:3: line edited" in out, out
    code, out, n = tamper(lambda lines: lines[:-1])
    assert code == 1 and f"events.jsonl:{n}: " in out and "lines removed" in out, out
    code, out, n = tamper(lambda lines: [*lines, lines[-1]])
    assert code == 1 and f"events.jsonl:{n + 1}: " in out, out
    code, out, n = tamper(lambda lines: [lines[0], *lines[2:]])
    assert code == 1 and "events.jsonl:2: hash chain broken" in out, out
    code, out, n = tamper(lambda lines: [*lines[:-1], lines[-1][:20]])
    assert code == 1 and f"events.jsonl:{n}: " in out, out


def test_a_run_whose_directory_is_removed_mid_run_ends_cleanly(engine, runs_dir, tmp_path):
    env = {**os.environ, "AIRLOCK_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.Popen([*AIRLOCK, "run", "--", "sh", "-c", "sleep 3; echo done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    assert wait_for(lambda: (tmp_path / "runs").is_dir() and any((tmp_path / "runs").iterdir()),
                    60)
    (run_dir,) = (tmp_path / "runs").iterdir()
    time.sleep(0.5)
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert proc.returncode == 0, err
    assert out == "done\n"
    assert "the run directory was removed during the run" in err
    report = json.loads((run_dir / "report.json").read_text())
    assert "removed during the run" in report["error"]


@pytest.mark.parametrize("command", [["run"], ["events"], ["doctor"], ["conformance"],
                                     ["images", "build"], ["policy", "check"], ["runs", "list"],
                                     ["serve"], ["gc"]], ids=" ".join)
def test_help_shows_flags_and_names_not_python_types(command):
    proc = subprocess.run([*AIRLOCK, *command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout and "<list" not in proc.stdout, proc.stdout
    if command == ["events"]:
        assert "{RUN|verify} [RUN]" in proc.stdout and "Keep printing events" in proc.stdout
    if command == ["doctor"]:
        assert "provider section is checked" in proc.stdout


def test_readme_cli_examples_run_as_written(engine, tmp_path):
    """The README's first command block, line by line, from a directory of its own (make
    check is tests/test_toolchain.py's; view serves until stopped; gc touches the shared
    engine)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("Then, with the virtual environment's", 1)[1].split("```sh", 1)[1]
    block = block.split("```", 1)[0]
    (tmp_path / "my-policy.yaml").write_text("extends: strict\nresources:\n  memory: 256m\n")
    expected = {"run -- sh": 1, "policy check": 0, "policy compile": 0, "doctor": 0,
                "runs list": 0}
    env = {**os.environ, "AIRLOCK_RUNS_DIR": str(tmp_path / "runs"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    ran = []
    for line in block.strip().splitlines():
        cmd = line.split("  #", 1)[0].strip()
        key = next((k for k in expected if cmd.startswith(f"airlock {k}")), None)
        if key is None:
            continue
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == expected[key], (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        ran.append(key)
        if key == "run -- sh":
            assert "uid=1000" in proc.stdout and "Read-only file system" in proc.stderr
        if key == "runs list":  # then events latest and events verify latest
            assert "ok: the chain is intact" in proc.stdout
    assert ran == list(expected)
