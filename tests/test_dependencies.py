"""CI ran inside the dependency ranges pyproject.toml promises: every installed requirement (the core ones
and the extras' that apply to this platform) satisfies its specifier, diffusers' and transformers' pins
included (the parity tests hold for the pinned diffusers only)."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extras: list[str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.name != "helios-train" and (r.marker is None or r.marker.evaluate())]


def test_installed_packages_are_inside_the_promised_ranges():
    outside = []
    for req in _requirements(["cluster", "gpu"]):  # what CI installs (dev)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            outside.append(f"{req.name}: not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            outside.append(f"{req.name} {installed} outside {req.specifier}")
    assert not outside, outside


def test_the_model_packages_are_pinned_to_a_tested_range():
    pins = {r.name: r.specifier for r in _requirements([])}
    for name in ("diffusers", "transformers"):
        assert any(s.operator == "<" for s in pins[name]), f"{name} has no upper bound"
