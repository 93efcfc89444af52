"""Real DVC in a temporary git repo: `dvc repro` of the data stages, a split parameter change
reruns exactly the affected stages, and `dvc push`/`dvc pull` round-trip through a local remote
(tests/test_architecture.py checks every stage's declared deps and params)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

DVC = Path(sys.executable).parent / "dvc"


def _run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_repro_rerun_push_pull(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _run("git", "init", "-q", cwd=repo)
    _run(str(DVC), "init", "-q", cwd=repo)
    _run(str(DVC), "config", "core.analytics", "false", cwd=repo)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages["stages"] = {k: v for k, v in stages["stages"].items() if k in ("generate_synthetic", "split", "validate")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    (repo / "src").symlink_to(REPO / "src")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["study"]["tasks"] = ["synthetic", "synthetic_random"]
    params["study"]["multitask_tasks"] = []  # their components are no longer in study.tasks
    params["tasks"]["synthetic_random"] = {"dataset": "synthetic", "split": {"rule": "random", "seed": 0}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "data" / "raw").mkdir(parents=True)
    (repo / "data" / "raw" / "README").write_text("raw data goes here\n")
    (repo / ".gitignore").write_text("/data/\n")
    # data/ is git-ignored, so `dvc add` cannot put raw.dvc there: data.dvc at the root, committed.
    (repo / "data.dvc").write_text("outs:\n- path: data/raw\n")
    _run(str(DVC), "commit", "-f", "data.dvc", cwd=repo)

    out = _run(str(DVC), "repro", cwd=repo)
    generated = len(stages["stages"]["generate_synthetic"]["foreach"])
    assert out.count("Running stage") == generated + 4  # each generated dataset, 2 splits, 2 validations
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "data/splits/synthetic_random" in str(lock["stages"]["split@synthetic_random"]["outs"])
    assert "Running stage" not in _run(str(DVC), "repro", cwd=repo)

    params["tasks"]["synthetic_random"]["split"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(str(DVC), "repro", cwd=repo)
    assert re.findall(r"Running stage '([^']+)'", out) == ["split@synthetic_random", "validate@synthetic_random"]

    remote = tmp_path / "remote"
    _run(str(DVC), "remote", "add", "-d", "local", str(remote), cwd=repo)
    _run(str(DVC), "push", cwd=repo)
    train = (repo / "data/splits/synthetic/train.csv").read_bytes()
    for path in ("data/splits", "data/generated", "data/raw", ".dvc/cache", "reports"):
        shutil.rmtree(repo / path)
    _run(str(DVC), "pull", cwd=repo)
    assert (repo / "data/splits/synthetic/train.csv").read_bytes() == train
    assert (repo / "data/raw/README").is_file() and (repo / "reports/validation/synthetic.json").is_file()
    assert "up to date" in _run(str(DVC), "status", cwd=repo)
