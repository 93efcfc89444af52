"""A torn ``state.pt`` (truncated, or empty: a crash of the machine, a disk that filled) in the newest epoch
directory (issue #24): a rerun skips it with a warning naming it and resumes from the complete one before it.

Real parts: Ray Train local mode, a real MLflow SQLite store, real checkpoints on disk. The run is stopped after
its third epoch's checkpoint as SIGTERM stops it (a ``KeyboardInterrupt``), injected here, not in the product.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from transferbench.engine import ray_worker
from transferbench.engine.checkpoints import latest_checkpoint
from transferbench.engine.finetune import COMPLETED_FILE
from transferbench.engine.run_files import read_run
from transferbench.engine.spec import STATE_FILE, checkpoint_name
from transferbench.engine.tracking import STUDY_TAG
from transferbench.stages.finetune import run_finetune

from .conftest import toy_settings

EPOCHS, STOP_AFTER = 5, 3


def _save(run_dir: Path, epoch: int) -> Path:
    path = run_dir / checkpoint_name(epoch) / STATE_FILE
    path.parent.mkdir(parents=True)
    torch.save({"loop": {"epoch": epoch, "history": []}}, path)
    return path


def test_a_torn_checkpoint_ray_train_registered_falls_back_to_the_one_before_it_not_to_a_newer_one(tmp_path,
                                                                                                      caplog):
    # Ray Train's registered checkpoint is epoch 2's (``newest``); epoch 3's was written but never registered
    for epoch in (1, 2, 3):
        _save(tmp_path, epoch)
    assert latest_checkpoint(tmp_path, newest=2)["loop"]["epoch"] == 2
    registered = tmp_path / checkpoint_name(2) / STATE_FILE
    registered.write_bytes(b"")
    assert latest_checkpoint(tmp_path, newest=2)["loop"]["epoch"] == 1
    assert f"skipping unreadable checkpoint {registered}" in caplog.text


def _child_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("transferbench")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STUDY_TAG}` = 'toy-study' "
                                                                        "and tags.`transferbench.kind` = 'finetune'")


def _tear_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _tear_all(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.slow
@pytest.mark.parametrize("tear", [_tear_half, _tear_all], ids=["truncated", "zero-bytes"])
def test_a_rerun_resumes_from_the_checkpoint_before_a_torn_newest_one(toy_splits, tmp_path, monkeypatch, caplog,
                                                                      tear):
    settings = toy_settings(
        toy_splits, finetune={"max_epochs": EPOCHS, "early_stop_patience": 50},
        ray={"num_workers": 0, "storage_path": str(tmp_path / "ray_results"), "checkpoints_to_keep": 50},
        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
                  "artifact_location": str(tmp_path / "mlartifacts")})
    options = {"task": "toy", "backbone": "test_resnet", "seed": 0, "metrics_dir": tmp_path / "metrics",
               "plots_dir": tmp_path / "plots"}
    checkpoint_epoch = ray_worker._Checkpointing.__call__

    def stopped_after_third(self, record, session):  # SIGTERM once the third epoch's checkpoint is being written
        checkpoint_epoch(self, record, session)
        if record["epoch"] == STOP_AFTER:
            raise KeyboardInterrupt("SIGTERM")

    with monkeypatch.context() as patch:
        patch.setattr(ray_worker._Checkpointing, "__call__", stopped_after_third)
        with pytest.raises(KeyboardInterrupt):
            run_finetune(settings, **options)
    (run_dir,) = (tmp_path / "ray_results").iterdir()
    assert sorted(p.parent.name for p in run_dir.glob(f"epoch_*/{STATE_FILE}")) == \
        [checkpoint_name(e) for e in range(1, STOP_AFTER + 1)]
    torn = run_dir / checkpoint_name(STOP_AFTER) / STATE_FILE
    tear(torn)

    caplog.clear()
    result = run_finetune(settings, **options)
    assert f"skipping unreadable checkpoint {torn}" in caplog.text
    assert result["resumed_at_epochs"] == [STOP_AFTER - 1], "not resumed from the checkpoint before the torn one"
    assert result["epochs_run"] == EPOCHS and (run_dir / COMPLETED_FILE).is_file()
    torch.load(torn, weights_only=True)  # written again when its epoch was trained again
    uri = settings.tracking.tracking_uri
    (child,) = _child_runs(uri)
    assert child.info.run_id == result["mlflow_run_id"] and child.info.status == "FINISHED"
    for key in ("val_loss", "train_loss", "lr"):
        steps = sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(child.info.run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), f"{key}: steps {steps}: a gap or a repeat"
    curve = pd.read_csv(tmp_path / "plots" / "toy" / "test_resnet" / "full" / "seed0-random-init.csv")
    assert list(curve["epoch"]) == list(range(1, EPOCHS + 1))
    on_disk = read_run(tmp_path / "metrics", "toy", "test_resnet", 0, "full")
    assert on_disk["resumed_at_epochs"] == [STOP_AFTER - 1]
