"""The environment files agree: pyproject pins == conda.yaml pins, all exact and locked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_conda_yaml_matches_pyproject_pins() -> None:
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert "python=3.11" in conda["dependencies"]
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    conda_pins = sorted(p for p in pip_section if not p.startswith("-e"))
    assert conda_pins == sorted(_pyproject_pins())


def test_every_direct_dependency_is_pinned_exactly_and_locked() -> None:
    locked = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            locked[_name(name)] = version
    for requirement in _pyproject_pins():
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+]*", requirement), requirement
        name, version = _name(requirement), requirement.split("==")[1]
        assert locked.get(name) == version, f"{requirement} disagrees with constraints.txt ({locked.get(name)})"
