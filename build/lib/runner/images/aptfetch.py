"""Debian packages fetched on the host, for builds that must not reach any network.

apt-get runs with private lists, cache and sources (never the host's /etc/apt/sources.list
or /var/lib/apt), against the mirror the host's own apt configuration names, and resolves
dependencies against the dpkg status of the image being built on. What it downloads is
put into the build context; the Dockerfile installs those files with dpkg, offline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from runner.errors import NotReady
from runner.images.hostconfig import debian_mirror

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# A private list older than this is refreshed before resolving.
LISTS_MAX_AGE_S = 6 * 3600


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "airlock" / "apt"


def _apt_options(state: Path, status_file: Path | None) -> list[str]:
    opts = {
        "Dir::Etc::sourcelist": str(state / "sources.list"),
        "Dir::Etc::sourceparts": "-",
        "Dir::State::Lists": str(state / "lists"),
        "Dir::Cache": str(state / "cache"),
        "Dir::Cache::archives": str(state / "archives"),
        "Dir::State::status": str(status_file or state / "empty-status"),
        "APT::Get::List-Cleanup": "0",
        "APT::Install-Recommends": "0",
        # Private directories: nothing of the host's apt or dpkg state is locked or read.
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root",
    }
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def _state_dir(mirror: str, suite: str) -> Path:
    import hashlib

    key = hashlib.sha256(f"{mirror}|{suite}".encode()).hexdigest()[:12]
    state = cache_root() / f"{suite}-{key}"
    for sub in ("lists/partial", "cache", "archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "empty-status").touch()
    signed = f" [signed-by={KEYRING}]" if KEYRING.is_file() else ""
    (state / "sources.list").write_text(f"deb{signed} {mirror} {suite} main\n")
    return state


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise NotReady(f"{what} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    return proc.stdout


def mirror_for(suite: str) -> str:
    if shutil.which("apt-get") is None:
        raise NotReady("apt-get is needed on the host to fetch Debian packages for the images",
                       hint="build Airlock's images on a Debian or Ubuntu host")
    mirror = debian_mirror(suite) or debian_mirror()
    if mirror is None:
        raise NotReady("no Debian mirror in the host's apt configuration (/etc/apt)",
                       hint="add a `deb <mirror> bookworm main` source to the host's apt configuration")
    return mirror


def update_lists(suite: str, progress: Callable[[str], None]) -> Path:
    mirror = mirror_for(suite)
    state = _state_dir(mirror, suite)
    stamp = state / "updated"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE_S:
        return state
    progress(f"reading the package lists of Debian {suite} from {mirror} ...")
    _run(["apt-get", *_apt_options(state, None), "-qq", "update"], f"apt-get update ({suite})")
    stamp.touch()
    return state


def fetch_debs(suite: str, packages: tuple[str, ...], status_file: Path, dest: Path,
               progress: Callable[[str], None]) -> list[str]:
    """Download `packages` and whatever they need that `status_file` lacks into `dest`.

    Returns the file names; an empty list means the image already has everything.
    """
    state = update_lists(suite, progress)
    archives = state / "archives"
    for old in archives.glob("*.deb"):
        old.unlink()
    progress(f"fetching Debian packages on the host: {' '.join(packages)}")
    _run(["apt-get", *_apt_options(state, status_file), "-qq", "-y", "--download-only",
          "install", *packages], f"resolving {' '.join(packages)} against Debian {suite}")
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    for deb in sorted(archives.glob("*.deb")):
        shutil.move(str(deb), dest / deb.name)
        names.append(deb.name)
    return names
