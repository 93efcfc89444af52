"""Feeding the sensitivity study back: finetune.hyperparameters=tuned trains with the backbone's tuned values."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from transferbench.engine.run_files import read_run
from transferbench.stages.finetune import run_finetune

from .conftest import toy_settings


@pytest.mark.slow
def test_tuned_hyperparameters_are_used_and_tagged(toy_splits: Path, tmp_path: Path) -> None:
    tuned = {"lr": 3.0e-3, "warmup_iters": 0, "warmup_lr": 2.0e-7}
    settings = toy_settings(
        toy_splits, finetune={"hyperparameters": "tuned", "max_epochs": 1},
        backbones={"test_resnet": {"model": "test_resnet", "family": "convnet", "weights": "none", "preset": "tiny",
                                   "tuned": tuned}},
        ray={"storage_path": str(tmp_path / "ray_results")},
        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "artifact_location": str(tmp_path / "art"),
                  "system_metrics": False, "log_model": False})
    result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, metrics_dir=tmp_path / "m",
                          plots_dir=tmp_path / "p")
    written = read_run(tmp_path / "m", "toy", "test_resnet", 0)
    assert written["hyperparameters"] == "tuned"
    assert (written["lr"], written["warmup_iters"], written["warmup_lr"]) == (3.0e-3, 0, 2.0e-7)
    client = mlflow.MlflowClient(settings.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["transferbench.hyperparameters"] == "tuned"
    assert float(run.data.params["finetune.lr"]) == 3.0e-3
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr")] == [pytest.approx(3.0e-3)]
