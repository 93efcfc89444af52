"""Fixtures for the data tests: a temporary project directory with the repository's params.yaml,
the generated synthetic dataset, and (where the offline mirror exists) the real COVID-19 mirror."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from transferbench.config import build, Settings
from transferbench.data.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
MIRROR = Path(os.environ.get("TRANSFERBENCH_DATA_MIRROR", REPO.parent / "shared" / "datasets"))


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(root: Path, raw: dict) -> Settings:
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return build(Settings, raw)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A temporary working directory holding params.yaml (relative data paths resolve inside it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSFERBENCH_DATA_MIRROR", raising=False)
    return tmp_path


@pytest.fixture
def settings(project):
    return write_params(project, repo_params())


@pytest.fixture
def synthetic(settings):
    """The synthetic dataset generated under data/generated/synthetic; returns the settings."""
    generate(settings.data.synthetic, Path(settings.data.generated_dir) / "synthetic")
    return settings


@pytest.fixture(scope="session")
def covid_mirror() -> Path:
    source = MIRROR / "covid-chestxray"
    if not (source / "SHA256SUMS").is_file():
        pytest.skip(f"COVID-19 mirror not found at {source} (set TRANSFERBENCH_DATA_MIRROR)")
    return MIRROR


@pytest.fixture
def covid(settings, covid_mirror):
    """The real mirror fetched into data/raw/covid-chestxray of the temporary project."""
    from transferbench.data.registry import get_dataset

    get_dataset("covid-chestxray").fetch(Path(settings.data.raw_dir) / "covid-chestxray", mirror=covid_mirror)
    return settings
