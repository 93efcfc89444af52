"""``transferbench dashboard``: optuna-dashboard on the sensitivity studies' storage (docs/sensitivity.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml

from transferbench.cli import main
from transferbench.engine.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
TRANSFERBENCH = Path(sys.executable).with_name("transferbench")


def _params(tmp_path: Path, storage: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sensitivity"]["storage"] = f"sqlite:///{storage}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def test_dashboard_without_a_storage_names_the_missing_file(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)
    params = _params(tmp_path, tmp_path / "optuna" / "missing.db")
    assert main(["--params", str(params), "dashboard", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'optuna' / 'missing.db'}: no Optuna storage there yet" in err
    assert not (tmp_path / "optuna" / "missing.db").exists()


@pytest.mark.slow
def test_dashboard_serves_the_studies_of_the_sensitivity_storage(tmp_path: Path) -> None:
    storage = tmp_path / "optuna.db"
    study = optuna.create_study(study_name="toy-test_resnet-demo", storage=f"sqlite:///{storage}")
    study.optimize(lambda trial: trial.suggest_float("lr", 1e-5, 1e-1, log=True), n_trials=2)
    params = _params(tmp_path, storage)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
    server = subprocess.Popen([str(TRANSFERBENCH), "--params", str(params), "dashboard", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, studies = time.monotonic() + 60, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert studies is not None, f"no answer on port {port} (exit {server.poll()})"
        listed = {s["study_name"]: s for s in studies["study_summaries"]}
        assert "toy-test_resnet-demo" in listed, studies
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert f"optuna-dashboard on http://127.0.0.1:{port}/dashboard/ (storage sqlite:///{storage})" in output, output
