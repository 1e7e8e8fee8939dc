"""poetry.lock must pick one version of each package per machine.

Poetry writes a universal lock: a package may appear in several versions, each with the markers under which it
is installed (a string, or one per dependency group). Two versions whose markers both hold on the same machine
make every `poetry install` swap one for the other (Installing/Downgrading on each run), and an offline install
then fails. Checked for this interpreter, and for every Python the project supports on this platform.
"""

from __future__ import annotations

import collections
import platform
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.specifiers import SpecifierSet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is pytest's own dependency there
    import tomli as tomllib

LOCK = Path(__file__).resolve().parent.parent / "poetry.lock"


def _lock() -> dict:
    with open(LOCK, "rb") as f:
        return tomllib.load(f)


def package_marker(package: dict) -> str | None:
    """The package's own `markers` field as Poetry 2 writes it; per-group markers: any group counts."""
    m = package.get("markers")
    if isinstance(m, dict):
        m = " or ".join(f"({v})" for v in m.values())
    return m or None


def overlaps(lock: dict, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{name: [versions]} for each package locked in more than one version that applies under env."""
    live = collections.defaultdict(list)
    for p in lock["package"]:
        m = package_marker(p)
        if m is None or Marker(m).evaluate(env):
            live[p["name"]].append(p["version"])
    return {n: v for n, v in live.items() if len(v) > 1}


def test_one_version_per_package_here():
    bad = overlaps(_lock())
    assert not bad, (
        "poetry.lock holds packages in two versions that both apply to this machine (each `poetry install` "
        f"flips between them): {bad}"
    )


def _supported_pythons(lock: dict) -> list[str]:
    spec = SpecifierSet(lock["metadata"]["python-versions"])  # e.g. ">=3.10,<3.13"
    return [f"3.{minor}" for minor in range(8, 20) if spec.contains(f"3.{minor}.0")]


@pytest.mark.parametrize("python", _supported_pythons(_lock()))
def test_one_version_per_package_other_pythons(python):
    """The same on this OS and CPU under each Python the project allows (what a colleague's machine gets)."""
    env = dict(default_environment(), python_version=python, python_full_version=f"{python}.0")
    bad = overlaps(_lock(), env)
    assert not bad, f"Python {python} on {platform.machine()}: two versions apply at once: {bad}"


def test_checker_sees_an_overlap():
    """The check itself: two unconstrained versions of one package are reported, disjoint ones are not."""
    lock = {"package": [
        {"name": "a", "version": "1", "markers": 'python_version < "3"'},
        {"name": "a", "version": "2", "markers": 'python_version >= "3"'},
        {"name": "b", "version": "1", "markers": {"main": 'platform_system == "Linux"', "dev": "extra == 'x'"}},
        {"name": "b", "version": "2"},
    ]}
    env = dict(default_environment(), platform_system="Linux")
    assert overlaps(lock, env) == {"b": ["1", "2"]}


def _make_dry_run(target: str) -> list[str]:
    """The commands `make TARGET` would run from scratch (-B: as if nothing were installed), without running them."""
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    env = {**os.environ, "POETRY_PYPI_MIRROR_URL": "https://mirror.invalid/simple"}  # skips the pip lookup
    proc = subprocess.run(["make", "-n", "-B", target], cwd=LOCK.parent, env=env, capture_output=True, text=True,
                          check=True, timeout=60)
    return [line for line in proc.stdout.splitlines() if "poetry install" in line]


def test_demo_installs_the_main_group_only_and_install_eval_adds_the_harness():
    demo = _make_dry_run("demo")
    assert demo and all(line.endswith("install --compile --only main") for line in demo), demo
    assert _make_dry_run("install-eval")[-1].endswith("install --compile --only main,eval")
    assert any(line.endswith("--only main,eval") for line in _make_dry_run("test"))  # CI runs the harness tests
