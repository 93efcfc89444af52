"""Registry load-back on the real engine's output (issue #6, "Load-back").

Real fine-tunes (Ray Train, MLflow SQLite store) of a ConvNet and a Transformer on the toy
task in both training modes (full fine-tuning and the linear probe, issue #21), then
``transferbench register`` in a fresh process (no tracking URI but params'), then each mode's
``models:/<study>.<task>[.linear_probe]@champion`` is loaded with
``mlflow.pyfunc.load_model`` (the served model: safetensors + transferbench's code, no pickle) and scored on the test manifest with the engine's own data
path: it must reproduce the test metrics the run recorded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import yaml

from engine.conftest import toy_params, toy_splits  # noqa: F401
from transferbench.config import Settings, build
from transferbench.engine.run_files import read_run
from transferbench.evaluation.scoring import score_split
from transferbench.stages.finetune import run_finetune

pytestmark = pytest.mark.slow  # fine-tunes in Ray Train local mode (toy_params)

BACKBONES = ("test_resnet", "test_vit")


def test_champion_loads_back_and_reproduces_its_recorded_test_metrics(toy_splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    raw = toy_params(toy_splits, study={"backbones": list(BACKBONES), "modes": ["full", "linear_probe"]},
                     data={"reports_dir": str(tmp_path / "reports")},
                     ray={"storage_path": str(tmp_path / "ray_results")},
                     tracking={"tracking_uri": uri, "artifact_location": str(tmp_path / "mlartifacts")},
                     compare={"metrics_dir": str(tmp_path / "metrics")})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    settings = build(Settings, raw)
    for backbone in BACKBONES:
        for mode in ("full", "linear_probe"):
            run_finetune(settings, task="toy", backbone=backbone, seed=0, mode=mode, metrics_dir=tmp_path / "metrics",
                         plots_dir=tmp_path / "plots")

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "transferbench.cli", "--params", str(params), "register"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to MLflow's default store

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_registry_uri(uri)
    for mode, name in (("full", "toy-study.toy"), ("linear_probe", "toy-study.toy.linear_probe")):
        versions = client.search_model_versions(f"name = '{name}'")
        assert len(versions) == len(BACKBONES) and {v.tags["mode"] for v in versions} == {mode}
        champion = client.get_model_version_by_alias(name, "champion")
        recorded = read_run(tmp_path / "metrics", "toy", champion.tags["backbone"], 0, mode)
        assert champion.run_id == recorded["mlflow_run_id"] and recorded["mode"] == mode

        # the registered (served, safe) model: its module rebuilt from safetensors + transferbench's code
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion").unwrap_python_model().model
        scores = score_split(model, task="toy", task_settings=settings.task("toy"),
                             splits_dir=settings.data.splits_dir, cache_dir=tmp_path / "cache", split="test",
                             img_size=recorded["img_size"])
        for metric, value in scores.items():
            assert value == pytest.approx(recorded[f"test_{metric}"], abs=1e-9), (mode, metric)
