"""A real coding task end to end, per agent, in a user-supplied image, on runc and runsc.

Each real agent (Codex, Claude Code, the builtin loop), driven by a scripted provider,
works on a git repository in the workspace (copy mode): it reads the failing test, runs
`make test` (which fails), fixes the code, runs `make test` again (which passes). The host
gets a changes.patch that applies to a clean clone with `git apply` and makes the test pass.
The image is the user's: a Dockerfile FROM Airlock's base that adds a package from the
host's Debian mirror (no registry is reachable here).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from runner.images.build import image_tag
from runner.testing.scripted_provider import ScriptedProvider
from tests.conftest import RUNTIMES, write_policy

pytestmark = [pytest.mark.usefixtures("engine"), pytest.mark.slow]
KEY_VAR = "AIRLOCK_TEST_TASK_KEY"
KEY = "sk-task-test-key"
MODELS = {"codex": ("openai", "gpt-5.5"), "claude-code": ("anthropic", "claude-sonnet-4-5"),
          "builtin": ("anthropic", "claude-sonnet-4-5")}

TEST_FILE = """\
from calc import add

assert add(2, 3) == 5, f"add(2, 3) returned {add(2, 3)}, expected 5"
print("tests passed")
"""
BUGGY = "def add(a, b):\n    return a - b\n"
FIXED = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def user_image(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task-image")
    (root / "Dockerfile").write_text(f"""\
FROM {image_tag("base")}
USER root
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends bc >/dev/null \\
 && rm -rf /var/lib/apt/lists/*
""")
    return root / "Dockerfile"


def make_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "Makefile").write_text("test:\n\tpython3 test_calc.py\n")
    (root / ".gitignore").write_text("__pycache__/\n")
    (root / "calc.py").write_text(BUGGY)
    (root / "test_calc.py").write_text(TEST_FILE)
    git = ["git", "-C", str(root), "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a failing test"], check=True)
    return root


def script_for(agent: str) -> list[dict[str, Any]]:
    if agent == "codex":
        patch = ("*** Begin Patch\n*** Update File: calc.py\n@@\n-    return a - b\n"
                 "+    return a + b\n*** End Patch\n")
        return [{"tool": "exec_command", "arguments": {"cmd": "cat test_calc.py && git status --short"}},
                {"tool": "exec_command", "arguments": {"cmd": "make test"}},
                {"tool": "apply_patch", "input": patch},
                {"tool": "exec_command", "arguments": {"cmd": "make test"}},
                {"text": "Fixed add(): the test passes."}]
    if agent == "claude-code":
        def tool(name: str, **arguments: Any) -> dict[str, Any]:
            return {"tool": name, "arguments": arguments}
        return [tool("Read", file_path="/workspace/test_calc.py"),
                tool("Bash", command="make test", description="run the tests"),
                tool("Read", file_path="/workspace/calc.py"),  # Claude Code edits only what it read
                tool("Edit", file_path="/workspace/calc.py", old_string="return a - b",
                     new_string="return a + b"),
                tool("Bash", command="make test", description="run the tests again"),
                {"text": "Fixed add(): the test passes."}]
    return [{"tool": "shell", "id": "toolu_read", "arguments": {"command": "cat test_calc.py"}},
            {"tool": "shell", "id": "toolu_make1", "arguments": {"command": "make test"}},
            {"tool": "write_file", "id": "toolu_fix",
             "arguments": {"path": "/workspace/calc.py", "content": FIXED}},
            {"tool": "shell", "id": "toolu_make2", "arguments": {"command": "make test"}},
            {"text": "Fixed add(): the test passes."}]


AGENT_RUNTIMES = [pytest.param(a, rt, id=f"{a}-{rt}")
                  for a in ("builtin", "claude-code", "codex") for rt in RUNTIMES]


@pytest.mark.parametrize(("agent", "runtime"), AGENT_RUNTIMES)
def test_fix_the_failing_test(airlock, tmp_path, user_image, agent, runtime):
    ws = make_repo(tmp_path / "repo")
    backend, model = MODELS[agent]
    with ScriptedProvider(script_for(agent), api_key=KEY) as up:
        base = up.url + "/v1" if backend == "openai" else up.url
        policy = write_policy(tmp_path, f"""\
extends: default
image: {user_image}
filesystem: {{workspace: copy}}
resources: {{wall_time: 240s}}
provider:
  backend: {backend}
  base_url: {base}
  api_key_env: {KEY_VAR}
  models: {{default: {model}}}
""")
        r = airlock("run", "--agent", agent, "--policy", policy, "--runtime", runtime,
                    "--workspace", str(ws), "--json", "--", "Fix the failing test",
                    env={KEY_VAR: KEY}, timeout=400)
        bodies = [json.dumps(g.body) for g in up.generation_requests()]
    assert r.code == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = r.report
    assert report["status"] == "succeeded" and report["image"].startswith(f"airlock/{agent}-on:"), report
    # What the model saw: the test read, make failing first, passing after the fix.
    seen = "\n".join(bodies)
    assert "tests passed" in seen and "expected 5" in seen, seen[-3000:]
    first_fail = seen.find("returned -1, expected 5")
    assert first_fail != -1, seen[-3000:]
    assert seen.find('tests passed\\n', first_fail) != -1 or seen.rfind("tests passed") > first_fail
    # The host's workspace is untouched; the patch applies to a clean clone and fixes it.
    assert (ws / "calc.py").read_text() == BUGGY
    patch = r.run_dir / "changes.patch"
    assert patch.is_file() and "+    return a + b" in patch.read_text()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "apply", "--check", str(patch)], check=True)
    subprocess.run(["git", "-C", str(clone), "apply", str(patch)], check=True)
    fixed = subprocess.run(["python3", "test_calc.py"], cwd=clone, capture_output=True, text=True)
    assert fixed.returncode == 0 and "tests passed" in fixed.stdout, fixed.stderr
