"""Bring your own image: a local image, a Dockerfile or a devcontainer.json, with what
Airlock needs layered on top, offline, each layer tagged by a digest of its inputs.

    user image (as given, or built from the Dockerfile)
      -> airlock/adapted:<digest>   python3 if missing (Debian only, from the host's mirror,
                                    no network), the shim, user 1000, setuid/setgid bits
                                    stripped, no entrypoint (images/adapt/Dockerfile)
      -> airlock/<agent>-on:<digest> the agent's own image recipe (images/<agent>/), when
                                    the run's agent needs more than the shim

The run's boundary does not depend on the image: the root is read-only, the policy's
tmpfs map, uid, seccomp profile and capabilities are applied at create time whatever the
image says (an image whose USER is root still runs as the sandbox uid).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.errors import BadInput, NotReady

Progress = Callable[[str], None]
SOURCE_LABEL = "airlock.source"
# The builtin agent's wheels are fetched for this interpreter (runner/images/build.py).
BUILTIN_PYTHON = "3.11"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _devcontainer(path: Path) -> tuple[str | None, Path | None, Path | None]:
    """(image, dockerfile, context) named by a devcontainer.json."""
    text = path.read_text()
    # devcontainer.json is JSON with comments (and trailing commas).
    text = re.sub(r"(?m)^\s*//.*$", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r",(\s*[}\]])", r"\1", text)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BadInput(f"{path}: not valid devcontainer JSON ({exc})") from None
    build = doc.get("build") or {}
    dockerfile = build.get("dockerfile") or doc.get("dockerFile")
    if dockerfile:
        df = (path.parent / dockerfile).resolve()
        ctx = (path.parent / (build.get("context") or doc.get("context") or ".")).resolve()
        return None, df, ctx
    if doc.get("image"):
        return str(doc["image"]), None, None
    raise BadInput(f"{path}: names neither `image` nor `build.dockerfile`",
                   hint="Airlock takes a devcontainer's image or Dockerfile; compose-based "
                        "devcontainers are not supported")


def _build_dockerfile(client: Any, dockerfile: Path, context: Path, progress: Progress) -> str:
    from runner.images.build import _stream_build

    if not dockerfile.is_file():
        raise BadInput(f"no Dockerfile at {dockerfile}")
    tag = f"airlock/user:{_digest(str(dockerfile), dockerfile.read_bytes(), str(context))}"
    progress(f"building {dockerfile} as {tag} (the engine's build cache makes a rebuild cheap) ...")
    rel = str(dockerfile.relative_to(context)) if dockerfile.is_relative_to(context) else str(dockerfile)
    _stream_build(client, context, tag, {}, progress, dockerfile=rel,
                  labels={SOURCE_LABEL: f"Dockerfile {dockerfile}"})
    return tag


def user_image(ref: str, client: Any, progress: Progress) -> tuple[str, str]:
    """(an engine reference to the user's image, a description of where it came from)."""
    import docker.errors

    path = Path(ref).expanduser()
    if path.is_dir():
        for candidate in (path / ".devcontainer" / "devcontainer.json", path / "devcontainer.json",
                          path / "Dockerfile"):
            if candidate.is_file():
                path = candidate
                break
    if path.is_file():
        path = path.resolve()
        if path.name.endswith(".json"):
            image, dockerfile, context = _devcontainer(path)
            if dockerfile is not None and context is not None:
                return _build_dockerfile(client, dockerfile, context, progress), f"devcontainer {path}"
            assert image is not None
            ref = image
        else:
            return _build_dockerfile(client, path, path.parent, progress), f"Dockerfile {path}"
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        raise NotReady(f"no local image {ref!r} (Airlock never pulls)",
                       hint="build or load it into the engine first, or name a Dockerfile "
                            "or devcontainer.json") from None
    return ref, f"image {ref}"


def _os_release(client: Any, image: str) -> dict[str, str]:
    from runner.images.debs import read_file

    raw = read_file(client, image, "/etc/os-release") or read_file(client, image, "/usr/lib/os-release")
    out: dict[str, str] = {}
    for line in (raw or b"").decode(errors="replace").splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def _python_version(client: Any, image: str) -> str | None:
    """The image's python3 as X.Y, read from its files (the image is not started)."""
    from runner.images.debs import existing_paths

    candidates = [f"{d}/python3.{minor}" for d in ("/usr/bin", "/usr/local/bin")
                  for minor in range(20, 6, -1)]
    found = existing_paths(client, image, candidates)
    return found[0].rsplit("python", 1)[1] if found else None


def adapt(client: Any, image: str, source: str, progress: Progress) -> str:
    """The user's image with the shim, python3 and the sandbox user; return its tag."""
    from runner.images.build import SANDBOX_DIR, _stream_build, images_dir
    from runner.images.debs import install_debs

    image_id = client.images.get(image).id
    dockerfile = images_dir() / "adapt" / "Dockerfile"
    shim = [SANDBOX_DIR / "shim.py", SANDBOX_DIR / "selftest.py"]
    tag = f"airlock/adapted:{_digest(image_id, dockerfile.read_bytes(), *(p.read_bytes() for p in shim))}"
    if _present(client, tag):
        return tag
    osr = _os_release(client, image)
    found = osr.get("PRETTY_NAME") or "an image without /etc/os-release"
    family = {osr.get("ID", ""), *osr.get("ID_LIKE", "").split()}
    base = image
    if _python_version(client, image) is None:
        if "debian" not in family or osr.get("ID") != "debian" or not osr.get("VERSION_CODENAME"):
            raise NotReady(
                f"cannot layer Airlock onto {source}: found {found}, and it has no python3, which "
                "the in-sandbox shim runs on",
                hint="add python3 to the image (Airlock installs it itself only into Debian "
                     "images, from the host's Debian mirror)")
        base = install_debs(client, image, ("python3",), osr["VERSION_CODENAME"],
                            "airlock/adapted-debs", progress)
    if _python_version(client, base) is None:
        raise NotReady(f"cannot layer Airlock onto {source}: python3 is still missing")
    ctx = Path(tempfile.mkdtemp(prefix="airlock-adapt-"))
    try:
        shutil.copy(dockerfile, ctx / "Dockerfile")
        (ctx / "sandbox").mkdir()
        for p in shim:
            shutil.copy(p, ctx / "sandbox" / p.name)
        progress(f"layering Airlock onto {source} ({found}) as {tag} ...")
        _stream_build(client, ctx, tag, {"PARENT": base}, progress,
                      labels={SOURCE_LABEL: source})
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    return tag


def _present(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def with_agent(client: Any, adapted: str, agent_image: str, source: str, progress: Progress) -> str:
    """`adapted` plus what the agent's own Airlock image adds on top of `base`."""
    from runner.images.build import build_on, spec_for

    if agent_image == "base":
        return adapted
    spec = spec_for(agent_image)
    if spec.parent != "base":
        raise BadInput(f"image {agent_image!r} cannot be layered onto another image")
    if agent_image == "builtin":
        version = _python_version(client, adapted)
        if version != BUILTIN_PYTHON:
            raise NotReady(f"cannot layer the builtin agent onto {source}: it needs Python "
                           f"{BUILTIN_PYTHON}, the image has {version}",
                           hint="use a Debian 12 (bookworm) based image, or --agent codex / claude-code")
    return build_on(agent_image, adapted, client, progress, source=source)


def resolve(ref: str, agent_image: str, client: Any, progress: Progress) -> str:
    """The image a run uses when its policy or `--image` names `ref`."""
    from runner.images.build import SPECS, build, image_tag
    from runner.images.catalog import load_catalog

    load_catalog()
    if ref in SPECS:
        tag = image_tag(ref)
        if not _present(client, tag):
            tag = build(ref, client, progress)
        if agent_image in ("base", ref):
            return tag
        # Airlock's own images stand on `base`: the shim and the user are there already.
        return with_agent(client, tag, agent_image, f"airlock image {ref}", progress)
    image, source = user_image(ref, client, progress)
    return with_agent(client, adapt(client, image, source, progress), agent_image, source, progress)


def run_image(policy_image: str | None, agent_image: str, engine: Any) -> str:
    """The tag a run's sandbox is created from (built first when it is missing)."""
    import sys

    from runner.images.build import image_tag

    if not policy_image:
        return image_tag(agent_image)
    client = getattr(engine, "client", None)
    if client is None:  # a wrapping engine (conformance's recorder): builds go to Docker itself
        from runner.engines.docker_engine import connect

        client = connect().client

    def progress(msg: str) -> None:
        print(f"airlock: {msg}", file=sys.stderr, flush=True)

    return resolve(policy_image, agent_image, client, progress)
