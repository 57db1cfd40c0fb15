"""Bring your own image: a user's Dockerfile, a devcontainer.json and a local image become
sandboxes with the full boundary (the conformance suite passes on them), on runc and runsc.

No registry is reachable here, so the user's Dockerfile stands on Airlock's base (by its
local tag) and installs a package from the host's Debian mirror, as a user's would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.conformance import ATTACKS, Suite
from runner.conformance.table import plain
from runner.images.build import image_tag
from runner.policy.loader import load_policy
from tests.conftest import RUNTIMES, write_policy

pytestmark = [pytest.mark.usefixtures("engine"), pytest.mark.slow]


def user_dockerfile(root: Path) -> Path:
    """A Dockerfile as a user writes one: USER root, a setuid binary, a package, an entrypoint."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(f"""\
FROM {image_tag("base")}
USER root
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends bc >/dev/null \\
 && rm -rf /var/lib/apt/lists/*
RUN chmod u+s /usr/bin/find /usr/bin/bc && echo user-image > /etc/marker \
 && mkdir /opt/mine && chown 1000:1000 /opt/mine
ENTRYPOINT ["/bin/echo", "the image's entrypoint ran"]
""")
    return root / "Dockerfile"


INSIDE = r"""
set -u
id -u; id -g
cat /etc/marker
echo '6*7' | bc
echo "setuid: $(find / -xdev -perm /6000 -type f 2>/dev/null | wc -l)"
touch /opt/mine/should-fail 2>&1 || true
df -h /tmp | tail -1
"""


def _check_boundary(r) -> None:
    assert r.code == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[:3] == ["1000", "1000", "user-image"], r.stdout
    assert "42" in lines and "setuid: 0" in r.stdout
    assert "Read-only file system" in r.stdout
    assert "entrypoint ran" not in r.stdout
    report = r.report
    assert report["image"].startswith("airlock/adapted:"), report["image"]


@pytest.fixture(scope="module")
def dockerfile(tmp_path_factory) -> Path:
    return user_dockerfile(tmp_path_factory.mktemp("byo") / "proj")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_user_dockerfile_runs_as_the_sandbox_user_with_no_setuid(airlock, runtime, dockerfile):
    r = airlock("run", "--quiet", "--runtime", runtime, "--image", str(dockerfile),
                "--", "sh", "-c", INSIDE)
    _check_boundary(r)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_devcontainer_build_and_image_forms(airlock, runtime, dockerfile, tmp_path):
    dc = dockerfile.parent / ".devcontainer"
    dc.mkdir(exist_ok=True)
    (dc / "devcontainer.json").write_text(
        '// a comment, as devcontainer.json allows\n'
        '{"name": "proj", "build": {"dockerfile": "../Dockerfile", "context": ".."},'
        ' "remoteUser": "root",}\n')
    r = airlock("run", "--quiet", "--runtime", runtime, "--image", str(dockerfile.parent),
                "--", "sh", "-c", INSIDE)
    _check_boundary(r)
    # The `image` form, naming a local image (here: the one the Dockerfile became).
    policy = write_policy(tmp_path, f"extends: default\nimage: {dockerfile.parent / 'dc2.json'}\n")
    import docker

    tags = [t for img in docker.from_env().images.list(filters={"label": "airlock.source"})
            for t in img.tags if t.startswith("airlock/user:")]
    assert tags
    (dockerfile.parent / "dc2.json").write_text(json.dumps({"image": tags[0]}))
    r2 = airlock("run", "--quiet", "--runtime", runtime, "--policy", policy, "--",
                 "sh", "-c", INSIDE)
    _check_boundary(r2)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_conformance_suite_passes_on_a_user_image(runtime, dockerfile, tmp_path):
    preset = "strict" if runtime == "runsc" else "default"
    policy = write_policy(tmp_path, f"extends: {preset}\nimage: {dockerfile}\n")
    report = Suite(load_policy(policy).policy, runtime=runtime).run()
    table = plain(report, width=200)
    assert len(report.results) == len(ATTACKS)
    assert not report.errors and not report.escaped, table


def test_images_list_says_what_was_built_from_what(airlock, dockerfile):
    airlock("run", "--quiet", "--image", str(dockerfile), "--", "true")
    r = airlock("images", "list")
    assert r.code == 0
    assert f"built from Dockerfile {dockerfile}" in r.stdout, r.stdout


def test_an_image_that_cannot_be_layered_is_refused_with_what_was_found(airlock, tmp_path):
    (tmp_path / "Dockerfile").write_text(f"""\
FROM {image_tag("base")}
USER root
RUN rm -f /usr/bin/python3* /usr/local/bin/python3* \\
 && printf 'ID=ubuntu\\nID_LIKE=debian\\nPRETTY_NAME="Ubuntu 24.04 LTS"\\n' > /etc/os-release
""")
    r = airlock("run", "--image", str(tmp_path / "Dockerfile"), "--", "true")
    assert r.code == 3, (r.stdout, r.stderr)
    assert "found Ubuntu 24.04 LTS" in r.stderr and "no python3" in r.stderr, r.stderr


def test_a_missing_local_image_is_not_pulled(airlock):
    r = airlock("run", "--image", "airlock-test/never-built:1", "--", "true")
    assert r.code == 3 and "never pulls" in r.stderr, r.stderr


def test_a_debian_image_without_python_gets_it_from_the_host_mirror(airlock, tmp_path):
    """python3 is the shim's runtime: Airlock installs it, with no network in the build."""
    (tmp_path / "Dockerfile").write_text(f"""\
FROM {image_tag("base")}
USER root
RUN dpkg --purge --force-depends python3 python3.11 python3-minimal python3.11-minimal \\
      libpython3.11-minimal libpython3.11-stdlib libpython3-stdlib media-types >/dev/null \\
 && ! command -v python3
""")
    r = airlock("run", "--quiet", "--image", str(tmp_path / "Dockerfile"), "--",
                "sh", "-c", "python3 --version; id -u")
    assert r.code == 0, (r.stdout, r.stderr)
    assert r.stdout.split() == ["Python", "3.11.2", "1000"], r.stdout
