"""Package layout only (metadata is in pyproject.toml).

The presets (`policies/`) and the image build contexts (`images/`) live at the top of
the repository, where the Makefile, the tests and the docs name them; the wheel and the
sdist carry them inside the package as `runner/data/policies` and `runner/data/images`,
where an installed Airlock looks for them (runner/policy/loader.py, runner/images/build.py).
pyproject.toml alone cannot map a directory outside the package into it while also
finding the package's own sub-packages, hence this file.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).resolve().parent
# One package per image context (images/<name>/Dockerfile, ...), so that each is data
# of a package of its own: a context may hold more than its Dockerfile.
DATA_DIRS = {"runner.data.policies": "policies", "runner.data.images": "images", **{
    f"runner.data.images.{d.name}": f"images/{d.name}"
    for d in sorted((HERE / "images").iterdir()) if d.is_dir()}}

setup(
    packages=[*find_namespace_packages(include=["runner", "runner.*"],
                                       exclude=["*.__pycache__", "runner.data.*"]),
              "runner.data.demo", *DATA_DIRS],
    package_dir=DATA_DIRS,
    package_data={
        "runner": ["py.typed"],
        "runner.data.demo": ["*"],
        "runner.view.static": ["*"],  # the viewer's page, script and style sheet
        "runner.data.policies": ["*.yaml"],
        **{name: ["*"] for name in DATA_DIRS if name.startswith("runner.data.images.")},
    },
)
