"""Sandbox images, tagged by a digest of their inputs.

An image's tag is `airlock/<name>:<digest>` where the digest covers its parent's tag,
its Dockerfile and every file put in its build context. `image_tag(name)` computes it
without the engine, so a run knows exactly which image it needs and a second build
finds everything already there and rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from runner.errors import NotReady
from runner.images.bootstrap import SUITE, bootstrap_rootfs, rootfs_tag
from runner.images.debs import install_debs
from runner.images.hostconfig import custom_ca_bundle, debian_mirror

REPO = "airlock"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # runner/
SANDBOX_DIR = PACKAGE_DIR / "sandbox"
CA_NAME = "airlock-build-ca.crt"


def images_dir() -> Path:
    for candidate in (PACKAGE_DIR.parent / "images", PACKAGE_DIR / "data" / "images"):
        if candidate.is_dir():
            return candidate
    raise NotReady("the images/ directory of Airlock is missing from this installation",
                   hint="reinstall Airlock from its wheel or sdist (both carry it as "
                   "runner/data/images), or set it up from a checkout with `make venv`")


Progress = Callable[[str], None]

# What coding agents call without asking: measured in docs/performance.md (+111 MB on the
# 118 MB root, no change in start cost). The C toolchain and node are in `dev`.
BASE_TOOLS = ("git", "make", "ripgrep", "patch", "diffutils", "procps", "jq", "file")


@dataclass(frozen=True)
class ImageSpec:
    name: str
    parent: str | None  # another spec's name; None means the bootstrapped rootfs
    # Files added to the build context: context-relative name -> source path.
    files: dict[str, Path] = field(default_factory=dict)
    # Python requirements installed on the host side into the context (offline build).
    pip: tuple[str, ...] = ()
    # npm packages packed on the host side into the context (offline build).
    npm: tuple[str, ...] = ()
    # Debian packages fetched on the host and installed before the Dockerfile runs, in a
    # container with no network (runner/images/aptfetch.py, `install_debs`).
    apt: tuple[str, ...] = ()
    description: str = ""


def sandbox_files(*names: str) -> dict[str, Path]:
    """In-sandbox code for an image's context. Each image takes only what it runs, so
    editing the builtin agent's loop does not change (and rebuild) the base image."""
    return {f"sandbox/{n}": SANDBOX_DIR / n for n in names}


SPECS: dict[str, ImageSpec] = {
    "base": ImageSpec("base", None, sandbox_files("shim.py", "selftest.py"),
                      apt=BASE_TOOLS,
                      description="Debian, python3, everyday tools (git, make, rg, jq, ...), "
                                  "the in-sandbox shim, a non-root user"),
}


def register(spec: ImageSpec) -> None:
    SPECS[spec.name] = spec


def _dockerfile(name: str) -> Path:
    path = images_dir() / name / "Dockerfile"
    if not path.is_file():
        raise NotReady(f"no Dockerfile for image {name!r} at {path}")
    return path


def spec_for(name: str) -> ImageSpec:
    if name not in SPECS:
        from runner.images.catalog import load_catalog

        load_catalog()
    if name not in SPECS:
        raise NotReady(f"no image named {name!r} in this installation (images: {', '.join(SPECS)})")
    return SPECS[name]


@cache
def image_tag(name: str) -> str:
    spec = spec_for(name)
    h = hashlib.sha256()
    h.update((image_tag(spec.parent) if spec.parent else rootfs_tag()).encode())
    h.update(_dockerfile(name).read_bytes())
    for rel, path in sorted(spec.files.items()):
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    for group, items in (("pip", spec.pip), ("npm", spec.npm), ("apt", spec.apt)):
        h.update(f"{group}:{json.dumps(sorted(items))}".encode())
    return f"{REPO}/{name}:{h.hexdigest()[:16]}"


def chain(name: str) -> list[str]:
    """The spec and its ancestors, base first."""
    out = []
    current: str | None = name
    while current is not None:
        out.append(current)
        current = spec_for(current).parent
    return out[::-1]


def image_present(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _pip_into(target: Path, requirements: tuple[str, ...], progress: Progress) -> None:
    """Install wheels on the host into a context folder, with the host's pip settings.

    The build itself then needs no network and no credentials: whatever index, mirror
    and CA the host's pip is configured with are what fetch the packages.
    """
    progress(f"fetching Python packages on the host: {' '.join(requirements)}")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-compile", "--target", str(target), "--only-binary=:all:",
           "--implementation", "cp", "--python-version", "3.11",
           "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "linux_x86_64",
           *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NotReady(f"pip could not fetch {' '.join(requirements)}:\n{proc.stderr[-2000:]}")


def _npm_into(target: Path, packages: tuple[str, ...], progress: Progress) -> None:
    progress(f"fetching npm packages on the host: {' '.join(packages)}")
    target.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        raise NotReady("npm is needed on the host to fetch " + " ".join(packages),
                       hint="apt-get install -y npm")
    proc = subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(target),
                           *packages], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NotReady(f"npm could not fetch {' '.join(packages)}:\n{proc.stderr[-2000:]}")


def _context(spec: ImageSpec, parent_tag: str, progress: Progress) -> tuple[Path, dict[str, str]]:
    ctx = Path(tempfile.mkdtemp(prefix=f"airlock-build-{spec.name}-"))
    shutil.copy(_dockerfile(spec.name), ctx / "Dockerfile")
    for rel, src in spec.files.items():
        dest = ctx / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    if spec.pip:
        _pip_into(ctx / "pip", spec.pip, progress)
    if spec.npm:
        _npm_into(ctx / "npm", spec.npm, progress)
    ca = custom_ca_bundle()
    # Always present, so Dockerfiles can COPY it unconditionally; empty means the
    # host trusts only the image's own bundle.
    (ctx / CA_NAME).write_bytes(ca.read_bytes() if ca else b"")
    # Dockerfiles that install Debian packages use the host's own mirror, never one of ours.
    buildargs = {"PARENT": parent_tag, "ROOTFS": parent_tag,
                 "APT_MIRROR": debian_mirror() or "", "CA_FILE": CA_NAME}
    return ctx, buildargs


def _stream_build(client: Any, ctx: Path, tag: str, buildargs: dict[str, str],
                  progress: Progress, *, dockerfile: str | None = None,
                  labels: dict[str, str] | None = None) -> None:
    last_error = None
    log: list[str] = []
    for chunk in client.api.build(path=str(ctx), tag=tag, buildargs=buildargs, rm=True,
                                  forcerm=True, pull=False, decode=True, dockerfile=dockerfile,
                                  labels={"airlock.image": tag, **(labels or {})}):
        if "stream" in chunk:
            line = chunk["stream"].rstrip()
            if line:
                log.append(line)
                if line.startswith("Step "):
                    progress("  " + line)
        if "error" in chunk:
            last_error = chunk["error"]
    if last_error:
        tail = "\n".join(log[-20:])
        raise NotReady(f"building {tag} failed: {last_error}\n{tail}")


def build(name: str, client: Any, progress: Progress = print, *, force: bool = False) -> str:
    """Build `name` and whatever it stands on that is missing; return its tag."""
    parent_tag = bootstrap_rootfs(client, progress)
    for step in chain(name):
        tag = image_tag(step)
        if not force and image_present(client, tag):
            progress(f"{tag} is up to date")
        else:
            progress(f"building {tag} ...")
            spec = spec_for(step)
            if spec.apt:
                parent_tag = install_debs(client, parent_tag, spec.apt, SUITE,
                                          f"{REPO}/{step}-debs", progress)
            ctx, buildargs = _context(spec, parent_tag, progress)
            try:
                _stream_build(client, ctx, tag, buildargs, progress)
            finally:
                shutil.rmtree(ctx, ignore_errors=True)
            client.images.get(tag).tag(f"{REPO}/{step}", "latest")
            progress(f"built {tag}")
        parent_tag = tag
    return parent_tag


def layered_tag(name: str, parent_id: str) -> str:
    """The tag of image `name`'s recipe built on another parent than its own."""
    h = hashlib.sha256()
    h.update(parent_id.encode())
    h.update(image_tag(name).encode())  # covers the Dockerfile, files and packages
    return f"{REPO}/{name}-on:{h.hexdigest()[:16]}"


def build_on(name: str, parent_tag: str, client: Any, progress: Progress = print, *,
             source: str = "") -> str:
    """Image `name`'s own recipe (not its parent chain) on `parent_tag`; return the tag."""
    tag = layered_tag(name, client.images.get(parent_tag).id)
    if image_present(client, tag):
        return tag
    spec = spec_for(name)
    progress(f"layering {name} onto {parent_tag} as {tag} ...")
    if spec.apt:
        raise NotReady(f"image {name!r} installs Debian packages and cannot be layered")
    ctx, buildargs = _context(spec, parent_tag, progress)
    try:
        _stream_build(client, ctx, tag, buildargs, progress,
                      labels={"airlock.source": f"{name} on {source or parent_tag}"})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return tag
