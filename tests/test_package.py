"""The package as a user gets it: a wheel and an sdist that carry everything, an installed
Airlock that works from any directory, the README's examples and the composite action.

Slow: each test builds or installs Airlock into a fresh virtual environment outside the
checkout (dependencies come from the machine's package index, as for any user).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from runner.images.build import image_tag
from runner.images.catalog import load_catalog
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SHIPPED = [
    "runner/data/policies/default.yaml", "runner/data/policies/strict.yaml",
    "runner/data/policies/ci.yaml", "runner/data/images/base/Dockerfile",
    "runner/data/images/builtin/Dockerfile", "runner/data/images/codex/Dockerfile",
    "runner/data/images/claude-code/Dockerfile", "runner/data/images/dev/Dockerfile",
    "runner/data/images/adapt/Dockerfile", "runner/data/demo/recording.jsonl",
    "runner/data/demo/policy.yaml", "runner/images/bootstrap.py", "runner/sandbox/shim.py",
    "runner/sandbox/selftest.py", "runner/sandbox/agent_loop.py", "runner/py.typed",
    "runner/conformance/probe.py", "runner/view/static/index.html",
    "runner/view/static/app.js", "runner/view/static/app.css", "runner/view/static/icon.svg",
]


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
        self.steps[name] = round(time.monotonic() - t0, 1)
        return proc  # type: ignore[no-any-return]


def _user_env(venv_bin: Path, home: Path) -> dict[str, str]:
    """A user's environment: the venv's airlock first on PATH, nothing of the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "AIRLOCK_RUNS_DIR", "AIRLOCK_PRESETS", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}"
    env["XDG_CACHE_HOME"] = str(home / "cache")
    env["AIRLOCK_AUTO_SERVE"] = "0"
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Timings]]:
    out = tmp_path_factory.mktemp("dist")
    # A copy of the checkout, so that the build's own files (build/, *.egg-info) never
    # land in it; python -m build makes the sdist from it, then the wheel from the sdist:
    # whatever the sdist forgets, the wheel lacks.
    source = tmp_path_factory.mktemp("source") / "airlock"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    timings = Timings()
    proc = timings.run("build sdist+wheel", [sys.executable, "-m", "build", "--outdir",
                                             str(out), str(source)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel = next(out.glob("airlock-*.whl"))
    sdist = next(out.glob("airlock-*.tar.gz"))
    yield wheel, sdist, timings


def test_wheel_and_sdist_carry_everything_and_pass_twine(dist):
    wheel, sdist, timings = dist
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SHIPPED if n not in names]
    assert not missing, missing
    check = timings.run("twine check", [sys.executable, "-m", "twine", "check", "--strict",
                                        str(wheel), str(sdist)], timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # The current (PEP 639) form: an SPDX expression, not the deprecated table.
    assert "License-Expression: Apache-2.0" in metadata
    assert not re.search(r"^License: ", metadata, re.M)


def test_installed_wheel_works_from_an_empty_directory(dist, engine, tmp_path: Path):
    wheel, _sdist, timings = dist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = timings.run("pip install wheel", [str(venv / "bin" / "pip"), "install", "--quiet",
                                                str(wheel)], timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "empty"
    work.mkdir()
    env = _user_env(venv / "bin", tmp_path)

    def airlock(name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return timings.run(name, [str(venv / "bin" / "airlock"), *args], cwd=work, env=env,
                           timeout=900)

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import runner; print(runner.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env, timeout=60)
    assert where.stdout.startswith(str(venv)), where  # the installed copy, not the checkout

    built = airlock("images build", "images", "build", "base", "builtin")
    assert built.returncode == 0, built.stderr[-3000:]
    load_catalog()
    # The same inputs as the checkout's: the same tags, so nothing was rebuilt.
    assert built.stdout.split() == [image_tag("base"), image_tag("builtin")]

    doctor = airlock("doctor", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "FAIL" not in doctor.stdout

    check = airlock("policy check", "policy", "check", "default", "strict", "ci")
    assert check.returncode == 0, check.stdout + check.stderr

    for preset in ("default", "strict", "ci"):
        run = airlock(f"run {preset}", "run", "-q", "--policy", preset, "--workspace", ".",
                      "--", "sh", "-c", "echo hello from $(id -u)")
        assert run.returncode == 0, (preset, run.stderr[-3000:])
        assert run.stdout == "hello from 1000\n", preset
    runs = sorted((work / "runs").iterdir())
    assert len(runs) == 3 and all((r / "report.json").is_file() for r in runs)

    # The README's Python API example, as written.
    api = timings.run("python api", [str(venv / "bin" / "python"), "-c", _readme_python()],
                      cwd=work, env=env, timeout=600)
    assert api.returncode == 0, api.stderr[-3000:]
    lines = api.stdout.splitlines()
    assert lines[0] == "run.start" and "agent.output" in lines, lines
    assert lines[-1].startswith("succeeded 0 "), lines
    print("\nwheel test timings (s):", timings.steps)


def _readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    return block


def test_the_composite_action_steps_run_as_written(engine, tmp_path: Path):
    """Each `run:` of action.yml, in order, as a runner would: inputs and github.*
    substituted, $GITHUB_PATH and $GITHUB_OUTPUT honoured; upload-artifact is GitHub's
    own and is checked for its path only."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    inputs = {k: v.get("default", "") for k, v in action["inputs"].items()}
    inputs["run"] = "airlock run --policy ci --workspace . --json -- sh -c 'echo changed > f.txt'"
    workspace = tmp_path / "checkout"
    workspace.mkdir()
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    github_path, github_output = tmp_path / "path", tmp_path / "output"
    github_path.touch()
    github_output.touch()
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "AIRLOCK_RUNS_DIR", "VIRTUAL_ENV")}
    base_env.update(RUNNER_TEMP=str(runner_temp), GITHUB_PATH=str(github_path),
                    GITHUB_OUTPUT=str(github_output), GITHUB_WORKSPACE=str(workspace),
                    XDG_CACHE_HOME=str(tmp_path / "cache"))

    # pip builds a local directory in place: give it a copy, not the checkout.
    action_path = tmp_path / "action" / "airlock"
    shutil.copytree(ROOT, action_path, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))

    def expand(text: str) -> str:
        text = text.replace("${{ github.action_path }}", str(action_path))
        return re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: str(inputs[m.group(1)]),
                      text)

    def condition(step: dict) -> bool:
        cond = str(step.get("if", "true"))
        return "inputs.run != ''" not in cond or bool(inputs["run"])

    timings = Timings()
    ran = []
    for step in action["runs"]["steps"]:
        if not condition(step):
            continue
        if "uses" in step:
            assert step["uses"].startswith("actions/upload-artifact@")
            assert step["with"]["path"] == "runs/"
            assert (workspace / "runs").is_dir()
            continue
        added = [p for p in github_path.read_text().splitlines() if p]
        env = {**base_env, **{k: expand(str(v)) for k, v in (step.get("env") or {}).items()}}
        env["PATH"] = ":".join([*reversed(added), base_env.get("PATH", "/usr/bin:/bin")])
        proc = timings.run(step["name"], ["bash", "-e", "-c", expand(step["run"])],
                           cwd=workspace, env=env, timeout=1200)
        assert proc.returncode == 0, (step["name"], proc.stdout[-3000:], proc.stderr[-3000:])
        ran.append(step["name"])
    assert ran == ["Install Airlock", "Build the sandbox images", "Check the machine", "Run"]
    assert "exit-code=0" in github_output.read_text()
    (run_dir,) = (workspace / "runs").iterdir()
    assert "+changed" in (run_dir / "changes.patch").read_text()
    assert not (workspace / "f.txt").exists()  # ci: a private copy, the patch comes back
    print("\naction test timings (s):", timings.steps)
