"""A Debian root filesystem made on the host, for when no base image can be pulled.

debootstrap fetches from the mirror the host's apt configuration names and the result
is imported as `airlock/rootfs:<digest>`; the digest covers the suite, variant and
package list, so it is made once per machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.errors import NotReady
from runner.images.hostconfig import custom_ca_bundle, debian_mirror

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("python3", "ca-certificates")
ROOTFS_REPO = "airlock/rootfs"


def rootfs_tag() -> str:
    key = f"{SUITE}|{VARIANT}|{','.join(sorted(PACKAGES))}|v1"
    return f"{ROOTFS_REPO}:{SUITE}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def bootstrap_rootfs(client: Any, progress: Callable[[str], None]) -> str:
    """Make sure the rootfs image exists; return its tag."""
    import docker.errors

    tag = rootfs_tag()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise NotReady(
            f"the base root filesystem {tag} is missing and cannot be bootstrapped here",
            hint="run `make engine` as root on Debian (it installs debootstrap), "
            "or run `airlock images build` as root",
        )
    mirror = debian_mirror(SUITE)
    if mirror is None:
        raise NotReady(
            f"no Debian {SUITE} mirror in the host's apt configuration (/etc/apt)",
            hint=f"add a `deb <mirror> {SUITE} main` source to the host's apt configuration",
        )
    env = dict(os.environ)
    ca = custom_ca_bundle()
    if ca is not None and mirror.startswith("https:"):
        # debootstrap's own downloads (wget) must verify an https mirror with the host's CA.
        env["SSL_CERT_FILE"] = str(ca)
    with tempfile.TemporaryDirectory(prefix="airlock-rootfs-") as tmp:
        root = Path(tmp) / "root"
        progress(f"bootstrapping Debian {SUITE} ({VARIANT}) from {mirror} ...")
        cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
               SUITE, str(root), mirror]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise NotReady(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
        # A smaller image starts faster and holds less for an agent to use.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                    "usr/share/man", "usr/share/info", "usr/share/locale"):
            shutil.rmtree(root / sub, ignore_errors=True)
            (root / sub).mkdir(parents=True, exist_ok=True)
        progress(f"importing the root filesystem as {tag} ...")
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        assert tar.stdout is not None
        image = client.api.import_image_from_stream(tar.stdout, repository=tag.split(":")[0],
                                                    tag=tag.split(":")[1])
        tar.wait()
        if tar.returncode != 0:
            raise NotReady(f"could not archive the bootstrapped root (tar exit {tar.returncode})")
        del image
    return tag
