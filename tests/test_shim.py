"""The shim's own pieces that run before any agent: its JSON writer (the host parses
every message with json.loads, and a message must never span two lines) and how it
starts the agent. The sandbox-level behaviour is covered by every run in the suite."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runner.sandbox import shim


def test_to_json_writes_what_json_dumps_writes():
    rng = random.Random(7)
    alphabet = [chr(i) for i in range(0x80)] + ["é", "中", "\u2028", "\ud800", "\udfff",
                                                "😀", "\U0010ffff", "\u0085", "\ufeff"]
    for _ in range(5000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        obj = {"type": s, "n": rng.randint(-10**20, 10**20), "f": rng.random() * 1e6,
               "l": [s, None, True, False, 1.5, {"k" + s: s}], "t": (1, "x")}
        line = shim.to_json(obj)
        assert line == json.dumps(obj, separators=(",", ":"))
        assert line.isascii() and "\n" not in line and "\r" not in line
        if not any("\ud800" <= ch <= "\udfff" for ch in s):  # json pairs lone surrogates
            assert json.loads(line)["type"] == s


def test_to_json_non_finite_floats_and_odd_objects():
    assert shim.to_json([float("nan"), float("inf"), -float("inf")]) == "[null,null,null]"
    assert json.loads(shim.to_json({"p": Path("/x"), 3: "three"})) == {"p": "/x", "3": "three"}


def test_find_executable_uses_the_agents_path(tmp_path: Path):
    tool = tmp_path / "bin" / "mytool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert shim.find_executable("mytool", {"PATH": f"/nonexistent:{tool.parent}"}) == str(tool)
    assert shim.find_executable("/bin/sh", {}) == "/bin/sh"
    with pytest.raises(FileNotFoundError):
        shim.find_executable("mytool", {"PATH": "/usr/bin"})
    (tmp_path / "bin" / "adir").mkdir()
    with pytest.raises(FileNotFoundError):
        shim.find_executable("adir", {"PATH": str(tmp_path / "bin")})


def test_spawn_agent_session_env_cwd_signals_and_descriptors(tmp_path: Path):
    # Run in a child interpreter: spawn_agent changes the working directory.
    code = f"""
import os, signal, socket, sys
sys.path.insert(0, {str(Path(shim.__file__).parent)!r})
import shim
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
keep = socket.socket()
os.set_inheritable(keep.fileno(), True)  # even an inheritable one is closed for the agent
out = os.path.join({str(tmp_path)!r}, "out")
pid = shim.spawn_agent(["sh", "-c", 'echo "$$ $(ps -o sid= -p $$ 2>/dev/null) $PWD $ONLY" > "$0"; '
                        'grep SigIgn /proc/self/status >> "$0"; '
                        'for f in /proc/self/fd/*; do readlink "$f"; done >> "$0"; true', out],
                       {{"PATH": "/usr/bin:/bin", "ONLY": "this"}}, {str(tmp_path)!r}, [keep.fileno()])
_, status = os.waitpid(pid, 0)
print(pid, keep.fileno(), os.waitstatus_to_exitcode(status))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    pid, kept_fd, status = (int(x) for x in res.stdout.split())
    assert status == 0
    lines = (tmp_path / "out").read_text().splitlines()
    fields = lines[0].split()
    assert fields[0] == str(pid) and fields[-2:] == [str(tmp_path), "this"]
    if len(fields) == 4:  # ps present: the agent leads its own session
        assert fields[1] == str(pid)
    ignored = int(lines[1].split(":")[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))  # SIGPIPE back to its default
    assert kept_fd > 2
    assert not [t for t in lines[2:] if t.startswith("socket:")]  # the shim's socket stayed
    assert os.getcwd() != str(tmp_path)  # only the child interpreter moved


def test_the_shim_imports_only_what_its_start_can_afford() -> None:
    """Under gVisor every module costs the run's start milliseconds (docs/performance.md):
    the shim and its self-test keep to C cores and leave out the Python layers above."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import shim, selftest; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(Path(shim.__file__).parent)],
                         capture_output=True, text=True, check=True).stdout.split()
    heavy = {"enum", "socket", "selectors", "signal", "threading", "json", "re", "typing",
             "subprocess", "contextlib", "collections"}
    assert not heavy & set(out), sorted(heavy & set(out))
    assert {"_socket", "_signal", "_thread", "marshal"} <= set(out)
