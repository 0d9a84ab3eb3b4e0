"""Every module imports (catches undefined names the linter might miss) and every package folder
is listed in pyproject.toml (an unlisted one would be missing from a non-editable install)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import tomllib

import diffalign

ROOT = Path(__file__).resolve().parent.parent
SIBLINGS = {
    "objectives": "diffalign.objectives",
    "samplers": "diffalign.samplers",
    "rewards": "diffalign.rewards",
    "benchmarks": "diffalign.benchmarks",
}


def _packages_on_disk() -> set[str]:
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] not in ("diffalign", *SIBLINGS):
            continue
        head = "diffalign" if rel.parts[0] == "diffalign" else SIBLINGS[rel.parts[0]]
        found.add(".".join([head, *rel.parts[1:]]))
    return found


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() == listed


def test_every_module_imports():
    for name in sorted(_packages_on_disk()):
        pkg = importlib.import_module(name)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{name}.{mod.name}")
    assert diffalign.__version__
