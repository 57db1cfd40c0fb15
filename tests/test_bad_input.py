"""Bad input, table-driven: each goes through `policy check`, `airlock run` in-process and
`airlock run` through the per-user server, and must give one line on stderr that says
why, no traceback, the documented exit code, the same on every path, and no run
directory left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.policy.loader import MAX_POLICY_BYTES
from tests import test_serve as serve_tests
from tests.conftest import AIRLOCK, ROOT


def _alias_bomb() -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        text += f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n"
        prev = name
    return text


def _doubling_bomb() -> str:
    # Few aliases (each doubles the one before): only the expanded count catches it.
    return "x0: &x0 [1, 1]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}]\n"
                                          for i in range(1, 40))


@dataclass
class Case:
    name: str
    args: list[str]  # after `airlock run`; {policy} is the case's policy file
    expect: str  # a piece of the one line on stderr
    policy: str | bytes | None = None  # the file's content, when the case has one
    code: int = 2
    check_line: int | None = None  # `policy check` must name this line

    def argv(self, path: Path | None) -> list[str]:
        return [a.replace("{policy}", str(path)) for a in self.args]


CASES = [
    Case("binary-policy", ["-p", "{policy}", "--", "true"], "a policy is a UTF-8 text file",
         b"name: x\nresources:\n  memory: \xff\xfe\x00\x01\n", check_line=3),
    Case("latin1-policy", ["-p", "{policy}", "--", "true"], "is not UTF-8",
         "name: caf\xe9\n".encode("latin-1"), check_line=1),
    Case("nul-bytes", ["-p", "{policy}", "--", "true"], "NUL byte", b"name: x\n\x00\n",
         check_line=2),
    Case("deep-nesting", ["-p", "{policy}", "--", "true"], "nested deeper",
         "a: " + "[" * 3000 + "]" * 3000 + "\n", check_line=1),
    Case("too-large", ["-p", "{policy}", "--", "true"], "larger than",
         "name: x\n" + "#" * (MAX_POLICY_BYTES + 10) + "\n", check_line=1),
    Case("alias-bomb", ["-p", "{policy}", "--", "true"], "aliases", _alias_bomb()),
    Case("doubling-alias-bomb", ["-p", "{policy}", "--", "true"], "aliases", _doubling_bomb()),
    Case("runtime-kata", ["--runtime", "kata", "--", "true"], "--runtime kata: "),
    Case("provider-nope", ["--provider", "nope", "--", "true"], "--provider nope: "),
    Case("wall-time-huge", ["-p", "{policy}", "--", "true"], "wall_time is at most",
         "resources:\n  wall_time: 100000000h\n", check_line=2),
    Case("unknown-key", ["-p", "{policy}", "--", "true"], "unknown key",
         "resources:\n  memroy: 1g\n", check_line=2),
    Case("yaml-error-3-lines", ["-p", "{policy}", "--", "true"], "YAML:",
         "name: x\nresources:\n  memory: [1g\n", check_line=3),
    Case("no-such-preset", ["-p", "nosuch", "--", "true"], "no preset or file named"),
    Case("model-without-provider", ["--model", "gpt-5", "--", "true"], "no provider section"),
    Case("model-not-allowed", ["-p", "{policy}", "--model", "gpt-5", "--", "true"],
         "not allowed by the policy",
         "provider:\n  backend: anthropic\n  models: {default: claude-sonnet-4-5}\n"),
    Case("workspace-root", ["-w", "/", "--", "true"], "host's root directory"),
    Case("workspace-proc", ["-w", "/proc", "--", "true"], "host's processes"),
    Case("workspace-etc", ["-w", "/etc", "--", "true"], "host's configuration"),
    Case("workspace-var-run", ["-w", "/var/run", "--", "true"], "/run"),
    Case("workspace-missing", ["-w", "/nonexistent-airlock-dir", "--", "true"],
         "is not a directory"),
    Case("enable-tool-alone", ["--enable-tool", "x", "--", "true"], "needs --mcp-server"),
]


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[serve_tests.Served]:
    served = serve_tests._start_server(tmp_path_factory.mktemp("bad-input-serve"),
                                       dict(os.environ))
    try:
        yield served
    finally:
        serve_tests._stop(served)


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("airlock: "), stderr
    return lines[0]


def _policy_file(case: Case, tmp_path: Path) -> Path | None:
    if case.policy is None:
        return None
    path = tmp_path / f"{case.name}.yaml"
    path.write_bytes(case.policy if isinstance(case.policy, bytes) else case.policy.encode())
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_in_process_and_through_the_server(case: Case, served: serve_tests.Served,
                                                     tmp_path: Path):
    path = _policy_file(case, tmp_path)
    before = set(os.listdir(served.runs))
    outputs = {}
    for how, extra_env in (("server", {}), ("in-process", {"AIRLOCK_NO_SERVE": "1"})):
        for flags in (["-q"], ["--json"], []):
            proc = subprocess.Popen([*AIRLOCK, "run", *flags, *case.argv(path)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=served.client_env(**extra_env), cwd=ROOT)
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=120)
            assert time.monotonic() - t0 < 60, f"{case.name} took too long"
            assert proc.returncode == case.code, (how, flags, err)
            line = _one_line(err)
            assert case.expect in line, (how, flags, line)
            if flags == ["--json"]:
                last = json.loads(out.splitlines()[-1])
                assert last["type"] == "airlock.error" and last["exit_code"] == case.code
                assert f"airlock: {last['error']}" == line
            else:
                assert out == ""
            if how == "server":
                assert served.served(proc.pid), served.log.read_text()[-2000:]
            outputs[(how, tuple(flags))] = (proc.returncode, err, out)
    for flags in (["-q"], ["--json"], []):
        assert outputs[("server", tuple(flags))] == outputs[("in-process", tuple(flags))]
    assert set(os.listdir(served.runs)) == before, "a refused run left a directory behind"


@pytest.mark.parametrize("case", [c for c in CASES if c.policy is not None], ids=lambda c: c.name)
def test_policy_check_refuses_what_run_refuses(case: Case, tmp_path: Path):
    path = _policy_file(case, tmp_path)
    assert path is not None
    if "--model" in case.args:
        pytest.skip("a valid policy: the model is the bad input")
    proc = subprocess.run([*AIRLOCK, "policy", "check", str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and case.expect in lines[0], lines
    if case.check_line is not None:
        assert lines[0].startswith(f"{path.name}:{case.check_line}: "), lines


def _cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AIRLOCK, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


OTHER: list[tuple[list[str], int, str]] = [
    (["events", "verify"], 2, "usage: airlock events verify RUN"),
    (["conformance", "--only", "nomatch"], 2, "--only nomatch: no attack"),
    (["doctor", "--policy", "nosuch"], 2, "no preset or file named 'nosuch'"),
    (["policy", "show", "nosuch"], 2, "no preset or file named 'nosuch'"),
    (["runs", "show", "no-such-run"], 2, "no-such-run"),
    (["events", "no-such-run"], 2, "no-such-run"),
]


@pytest.mark.parametrize(("args", "code", "expect"), OTHER, ids=lambda v: str(v))
def test_other_commands_say_why_in_one_line(args: list[str], code: int, expect: str,
                                            tmp_path: Path):
    proc = _cli(*args, env={"AIRLOCK_RUNS_DIR": str(tmp_path)})
    assert proc.returncode == code, proc
    assert expect in _one_line(proc.stderr)


def test_runs_list_with_no_runs_says_so(tmp_path: Path):
    proc = _cli("runs", "list", env={"AIRLOCK_RUNS_DIR": str(tmp_path / "none")})
    assert proc.returncode == 0
    assert "no runs" in proc.stderr and proc.stdout == ""




LATER = [
    ("missing-key", "provider:\n  backend: anthropic\n  api_key_env: AIRLOCK_TEST_NO_SUCH_KEY\n",
     [], 3, "provider key is missing"),
    ("unknown-image", None, ["--image", "airlock-test-no-such-image"], 3, "no local image"),
    ("cpus-above-host", "resources:\n  cpus: 256\n", [], 3, "the engine refused the sandbox"),
    ("builtin-without-provider", None, ["--agent", "builtin"], 2, "needs a model provider"),
]


@pytest.mark.parametrize(("name", "policy", "args", "code", "expect"), LATER,
                         ids=[c[0] for c in LATER])
def test_refused_after_the_run_began_says_why_and_keeps_its_record(
        name, policy, args, code, expect, served: serve_tests.Served, tmp_path: Path):
    extra = list(args)
    if policy is not None:
        path = tmp_path / f"{name}.yaml"
        path.write_text(policy)
        extra = ["-p", str(path), *extra]
    env = {k: v for k, v in served.client_env().items() if k != "AIRLOCK_TEST_NO_SUCH_KEY"}
    errors = {}
    for how, extra_env in (("server", {}), ("in-process", {"AIRLOCK_NO_SERVE": "1"})):
        for flags in (["-q"], ["--json"]):
            before = set(os.listdir(served.runs))
            task = ["x"] if "builtin" in extra else ["--", "true"]
            proc = subprocess.run([*AIRLOCK, "run", *flags, *extra, *task],
                                  capture_output=True, text=True, env={**env, **extra_env},
                                  cwd=ROOT, timeout=120)
            assert proc.returncode == code, (how, flags, proc.stderr)
            line = _one_line(proc.stderr)
            assert expect in line
            if flags == ["--json"]:
                last = json.loads(proc.stdout.splitlines()[-1])
                assert last["type"] == "airlock.error" and f"airlock: {last['error']}" == line
            (new,) = set(os.listdir(served.runs)) - before  # the record of the refusal
            report = json.loads((served.runs / new / "report.json").read_text())
            assert report["exit_code"] == code and expect in report["error"]
            errors[(how, tuple(flags))] = line
    assert len(set(errors.values())) == 1, errors


@pytest.mark.parametrize(("argv", "expect"), [
    (["--bogus", "--", "true"], "airlock: No such option: --bogus; fix: see `airlock run --help`"),
    ([], "airlock: Missing argument 'TASK'.; fix: see `airlock run --help`"),
    (["--runtime"], "airlock: Option '--runtime' requires an argument.; fix: see `airlock --help`"),
], ids=["unknown-flag", "no-task", "flag-without-value"])
def test_usage_errors_are_one_line_in_process_and_through_the_server(
        argv: list[str], expect: str, served: serve_tests.Served):
    # click's own form is a usage block and a box drawn around the message
    seen = {}
    for how, extra_env in (("server", {}), ("in-process", {"AIRLOCK_NO_SERVE": "1"})):
        proc = subprocess.run([*AIRLOCK, "run", *argv], capture_output=True, text=True,
                              env=served.client_env(**extra_env), cwd=ROOT, timeout=120)
        assert proc.returncode == 2, (how, proc)
        assert proc.stdout == "" and proc.stderr == expect + "\n", (how, proc.stderr)
        seen[how] = proc.stderr
    assert seen["server"] == seen["in-process"]


def test_an_unknown_command_is_one_line(tmp_path: Path):
    proc = _cli("nosuchcmd", env={"AIRLOCK_RUNS_DIR": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr == "airlock: No such command 'nosuchcmd'.; fix: see `airlock --help`\n"
