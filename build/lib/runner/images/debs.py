"""Debian packages installed into an image with no network at all.

The packages are fetched on the host (aptfetch) against the image's own dpkg status,
bind-mounted read-only into a container of the image that has no network, installed
with dpkg there, and the container is committed as a new image. Nothing of the .deb
files stays in any layer, and the build never reaches a mirror itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.errors import NotReady
from runner.images.aptfetch import fetch_debs

Progress = Callable[[str], None]
# dpkg wants to write its log and lock; a package's maintainer scripts may want /tmp.
_INSTALL = (
    "set -e; export DEBIAN_FRONTEND=noninteractive; ok=; "
    # dpkg -i takes a set in name order, so a pre-dependency later in the alphabet
    # (python3 -> python3-minimal -> python3.11-minimal) fails the first pass; each pass
    # installs what it can, and the set is complete, so a few passes end it.
    "for pass in 1 2 3 4; do "
    "if dpkg --force-confold --skip-same-version -i /tmp/airlock-debs/*.deb "
    ">>/tmp/dpkg.log 2>&1; then ok=1; break; fi; done; "
    "[ -n \"$ok\" ] || {{ tail -n 30 /tmp/dpkg.log; exit 1; }}; "
    "rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /var/cache/apt/*.bin "
    "/tmp/dpkg.log; "
    "{check}"
)


def read_file(client: Any, image: str, path: str) -> bytes | None:
    """A file of an image, read without starting it (None when absent)."""
    import docker.errors

    container = client.containers.create(image, command=["true"], entrypoint=[], network_disabled=True)
    try:
        try:
            bits, _ = container.get_archive(path)
        except docker.errors.NotFound:
            return None
        with tarfile.open(fileobj=io.BytesIO(b"".join(bits))) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                return None
            fh = tar.extractfile(member)
            return fh.read() if fh else None
    finally:
        container.remove(force=True)


def existing_paths(client: Any, image: str, paths: list[str]) -> list[str]:
    """Those of `paths` that exist in an image, in order (the image is not started)."""
    import docker.errors

    container = client.containers.create(image, command=["true"], entrypoint=[], network_disabled=True)
    found = []
    try:
        for path in paths:
            try:
                stream, _ = client.api.get_archive(container.id, path)
                stream.close()
            except docker.errors.NotFound:
                continue
            found.append(path)
    finally:
        container.remove(force=True)
    return found


def installed_tag(parent: str, packages: tuple[str, ...], repo: str) -> str:
    key = f"{parent}|{','.join(sorted(packages))}|v2"
    return f"{repo}:{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def install_debs(client: Any, parent: str, packages: tuple[str, ...], suite: str, repo: str,
                 progress: Progress, *, check: str = "true") -> str:
    """`parent` plus `packages` (and what they need) as a new image; return its tag."""
    import docker.errors

    tag = installed_tag(parent, packages, repo)
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    status = read_file(client, parent, "/var/lib/dpkg/status")
    if status is None:
        raise NotReady(f"{parent} has no dpkg database: Debian packages cannot be added to it")
    with tempfile.TemporaryDirectory(prefix="airlock-debs-") as tmp:
        status_file = Path(tmp) / "status"
        status_file.write_bytes(status)
        debs = Path(tmp) / "debs"
        names = fetch_debs(suite, packages, status_file, debs, progress)
        if not names:
            client.images.get(parent).tag(*tag.split(":"))
            return tag
        # Readable by the container's root whatever the host's umask made of the dir.
        debs.chmod(0o755)
        progress(f"installing {len(names)} Debian packages into {parent} (no network) ...")
        image_config = client.images.get(parent).attrs.get("Config") or {}
        container = client.containers.create(
            parent, entrypoint=["/bin/sh", "-c"], command=[_INSTALL.format(check=check)],
            user="0:0", network_mode="none",
            volumes={str(debs): {"bind": "/tmp/airlock-debs", "mode": "ro"}},
            labels={"airlock.build": "debs"})
        try:
            container.start()
            result = container.wait()
            if result.get("StatusCode") != 0:
                logs = container.logs().decode(errors="replace")[-3000:]
                raise NotReady(f"installing {' '.join(packages)} into {parent} failed:\n{logs}")
            repository, _, version = tag.partition(":")
            staged = container.commit(repository=repository, tag=f"{version}-staged",
                                      message=f"airlock: dpkg -i {' '.join(packages)}")
        finally:
            container.remove(force=True)
        # A commit keeps the install's entrypoint, and `docker commit --change
        # 'ENTRYPOINT []'` cannot clear it: a one-line build puts the parent's back.
        restore = (f"FROM {staged.id}\n"
                   f"ENTRYPOINT {json.dumps(image_config.get('Entrypoint') or [])}\n"
                   f"CMD {json.dumps(image_config.get('Cmd') or [])}\n"
                   f"USER {image_config.get('User') or '0:0'}\n")
        try:
            client.images.build(fileobj=io.BytesIO(restore.encode()), tag=tag, rm=True,
                                forcerm=True, pull=False)
        finally:
            client.images.remove(f"{repository}:{version}-staged", noprune=True)
    return tag
