"""The workspace as the policy gives it: read-only, a private copy, or the host's own.

In copy mode the agent gets a copy in a private host directory; at the end the changes
come back as a patch and the host's files are never written. The copy is made without
following symlinks, and the patch is computed by git, which records symlinks as links
(it never reads through them), so an agent cannot make the host read outside its copy.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runner.errors import BadInput


@dataclass
class PreparedWorkspace:
    host_path: Path | None  # what the sandbox sees at /workspace
    writable: bool
    origin: Path | None  # the user's directory
    copy: Path | None = None


def prepare(origin: Path | None, mode: str, scratch: Path, uid: int, gid: int) -> PreparedWorkspace:
    if origin is None:
        return PreparedWorkspace(None, False, None)
    origin = origin.resolve()
    if not origin.is_dir():
        raise BadInput(f"workspace {origin} is not a directory")
    if mode == "ro":
        return PreparedWorkspace(origin, False, origin)
    if mode == "rw":
        return PreparedWorkspace(origin, True, origin)
    copy = scratch / "workspace"
    shutil.copytree(origin, copy, symlinks=True,
                    ignore=lambda d, names: [n for n in names
                                             if _special(Path(d) / n)])
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in [*dirnames, *filenames]:
            os.lchown(Path(dirpath) / name, uid, gid)
    os.lchown(copy, uid, gid)
    return PreparedWorkspace(copy, True, origin, copy)


def _special(path: Path) -> bool:
    mode = path.lstat().st_mode
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


def patch(ws: PreparedWorkspace) -> str:
    """The agent's changes as a unified diff (git format, binary-safe), '' if none."""
    if ws.copy is None or ws.origin is None:
        return ""
    # Devices, fifos and sockets the agent made have no place in a patch, and reading
    # a fifo would hang the host.
    for dirpath, dirnames, filenames in os.walk(ws.copy):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if _special(p):
                p.unlink()
    git = shutil.which("git")
    if git is None:
        raise BadInput("git is needed on the host to compute the workspace patch")
    proc = subprocess.run(
        [git, "-c", "core.quotepath=off", "diff", "--no-index", "--binary", "--no-color",
         "--no-ext-diff", "--no-textconv", "--src-prefix=a/", "--dst-prefix=b/",
         str(ws.origin), str(ws.copy)],
        capture_output=True, env={"PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent",
                                  "GIT_CONFIG_NOSYSTEM": "1"},
    )
    if proc.returncode not in (0, 1):
        raise BadInput(f"git diff failed: {proc.stderr.decode(errors='replace')[:500]}")
    text = proc.stdout.decode("utf-8", errors="surrogateescape")
    origin, copy = str(ws.origin).lstrip("/"), str(ws.copy).lstrip("/")
    return text.replace(f"a/{origin}/", "a/").replace(f"b/{copy}/", "b/").replace(
        f"a/{copy}/", "a/").replace(f"b/{origin}/", "b/")
