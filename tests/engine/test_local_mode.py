"""``ray.num_workers: 0``: Ray Train local mode, the fine-tune in the calling process (issue #19).

Real parts: Ray Train's local mode, a real MLflow SQLite store, real checkpoints on disk, and a
real SIGKILL of a ``transferbench finetune`` process from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from transferbench.engine.checkpoints import latest_checkpoint, prune_checkpoints
from transferbench.engine.finetune import COMPLETED_FILE
from transferbench.engine.run_files import read_run, record_path, result_path
from transferbench.engine.spec import FINAL_FILE, STATE_FILE, checkpoint_name
from transferbench.engine.tasks import kind_for_task
from transferbench.engine.tracking import STUDY_TAG
from transferbench.models import build_model
from transferbench.stages.finetune import run_finetune

from .conftest import toy_params, toy_settings

REPO = Path(__file__).resolve().parents[2]


def _local(root: Path, tmp: Path, **overrides: dict) -> dict:
    ray = {"num_workers": 0, "storage_path": str(tmp / "ray_results"), **overrides.pop("ray", {})}
    tracking = {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}", "artifact_location": str(tmp / "mlartifacts")}
    return toy_params(root, ray=ray, tracking=tracking, **overrides)


def _child_runs(uri: str, study: str = "toy-study") -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("transferbench")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`transferbench.kind` = 'finetune'")


def test_local_mode_trains_in_this_process_without_a_ray_cluster(toy_splits, tmp_path):
    import ray

    settings = toy_settings(toy_splits, **{k: v for k, v in _local(toy_splits, tmp_path).items()
                                           if k in ("ray", "tracking")})
    assert settings.ray.local_mode
    connected_before = ray.is_initialized()
    result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, metrics_dir=tmp_path / "metrics",
                          plots_dir=tmp_path / "plots")
    if not connected_before:
        assert not ray.is_initialized(), "local mode started or joined a Ray cluster"
    assert result["num_workers"] == 0 and result["world_size"] == 1 and result["ray_nodes"] == 1
    assert (result["device"], result["precision"]) == ("cpu", "fp32")
    on_disk = read_run(tmp_path / "metrics", "toy", "test_resnet", 0, "full")
    assert on_disk == result and result["resumed_at_epochs"] == []
    # the metrics file holds only the run's numbers (what dvc metrics show prints); its record the rest
    metrics_file = result_path(tmp_path / "metrics", "toy", "test_resnet", 0, "full")
    assert metrics_file == tmp_path / "metrics" / "toy" / "test_resnet" / "full" / "seed0.json"
    metrics = json.loads(metrics_file.read_text())
    assert "test_score" in metrics and "val_score" in metrics
    assert all(v is None or type(v) in (int, float) for v in metrics.values()), metrics
    record_file = record_path(tmp_path / "metrics", metrics_file)
    assert record_file == tmp_path / "metrics.runs" / "toy" / "test_resnet" / "full" / "seed0.json"
    record = json.loads(record_file.read_text())
    assert record["mlflow_run_id"] == result["mlflow_run_id"] and record["weights_label"] == "random-init"
    assert not set(metrics) & set(record)
    run_dir = Path(settings.ray.storage_path) / result["ray_run_name"]
    final = json.loads((run_dir / FINAL_FILE).read_text())
    assert final["worker_nodes"][0].startswith("local:")
    # Local mode prunes as Ray Train's CheckpointConfig would: the best by val loss, plus the latest.
    kept = sorted(p.name for p in run_dir.glob("epoch_*"))
    assert f"epoch_{result['epochs_run']:04d}" in kept and checkpoint_name(result["best_epoch"]) in kept
    assert len(kept) <= 2 and (run_dir / COMPLETED_FILE).is_file()
    (child,) = _child_runs(settings.tracking.tracking_uri)
    assert child.info.run_id == result["mlflow_run_id"] and child.info.status == "FINISHED"
    assert child.data.params["ray.num_workers"] == "0" and child.data.tags["transferbench.world_size"] == "1"
    history = mlflow.MlflowClient(settings.tracking.tracking_uri).get_metric_history(child.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(1, result["epochs_run"] + 1))
    assert [p.name for p in (tmp_path / "plots" / "toy" / "test_resnet" / "full").iterdir()] == \
        ["seed0-random-init.csv"]
    curve = pd.read_csv(tmp_path / "plots" / "toy" / "test_resnet" / "full" / "seed0-random-init.csv")
    assert list(curve["epoch"]) == list(range(1, result["epochs_run"] + 1))


def _state(epoch: int, val_loss: float) -> dict:
    return {"model": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {},
            "loop": {"epoch": epoch, "history": [{"epoch": epoch, "val_loss": val_loss}]}}


def test_resume_skips_a_half_written_and_a_torn_checkpoint_naming_the_file(tmp_path, caplog):
    for epoch in (1, 2, 3):
        (tmp_path / checkpoint_name(epoch)).mkdir()
        torch.save(_state(epoch, 1.0 / epoch), tmp_path / checkpoint_name(epoch) / STATE_FILE)
    torn = tmp_path / checkpoint_name(3) / STATE_FILE
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # e.g. the disk filled up mid-write
    (tmp_path / checkpoint_name(4)).mkdir()  # killed while writing epoch 4: only its .tmp exists
    (tmp_path / checkpoint_name(4) / f"{STATE_FILE}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "epoch_notanumber").mkdir()
    state = latest_checkpoint(tmp_path)
    assert state is not None and state["loop"]["epoch"] == 2
    assert str(torn) in caplog.text and "skipping unreadable checkpoint" in caplog.text
    empty = tmp_path / "new-run"
    empty.mkdir()
    assert latest_checkpoint(empty) is None


def test_pruning_keeps_the_best_by_val_loss_and_the_latest(tmp_path):
    losses = [0.9, 0.5, 0.7, 0.5, 0.8]  # epoch 2 is the best (ties go to the earlier epoch, as in loop.fit)
    for epoch in range(1, 6):
        (tmp_path / checkpoint_name(epoch)).mkdir()
        (tmp_path / checkpoint_name(epoch) / STATE_FILE).write_bytes(b"x")
    history = [{"epoch": e, "val_loss": v} for e, v in enumerate(losses, start=1)]
    assert prune_checkpoints(tmp_path, history, keep=1, selection="loss", higher_is_better=False) == [2, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(2), checkpoint_name(5)]
    # nothing pruned is brought back; a higher-is-better selection keeps the highest
    assert prune_checkpoints(tmp_path, history, keep=3, selection="loss", higher_is_better=False) == [2, 5]
    assert prune_checkpoints(tmp_path, history, keep=1, selection="loss", higher_is_better=True) == [5]


@pytest.mark.slow
def test_a_sigkilled_local_mode_finetune_resumes_into_the_same_mlflow_run_with_no_gap_or_repeat(toy_splits,
                                                                                                   tmp_path):
    # Keep every checkpoint, so that after the newest is torn the one before it is there to resume from.
    params = _local(toy_splits, tmp_path, ray={"checkpoints_to_keep": 50},
                    finetune={"max_epochs": 14, "early_stop_patience": 50, "img_size": 32, "batch_size": 8})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "transferbench.cli", "--params", str(params_file), "finetune", "--task", "toy",
               "--backbone", "test_resnet", "--seed", "0", "--metrics-dir", str(tmp_path / "metrics"),
               "--plots-dir", str(tmp_path / "plots")]
    storage = tmp_path / "ray_results"
    stage = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not list(storage.glob(f"*/{checkpoint_name(3)}/{STATE_FILE}")):
        assert stage.poll() is None, f"the fine-tune ended before its third checkpoint:\n{stage.stdout.read()}"
        assert time.monotonic() < deadline, "no third checkpoint within 240 s"
        time.sleep(0.02)
    stage.send_signal(signal.SIGKILL)  # from outside, mid-run: no handler, no cleanup
    stage.wait(timeout=30)
    assert stage.returncode == -signal.SIGKILL
    (run_dir,) = storage.iterdir()
    assert not (run_dir / COMPLETED_FILE).exists() and not (tmp_path / "metrics").exists()
    complete = sorted(int(p.parent.name[6:]) for p in run_dir.glob(f"epoch_*/{STATE_FILE}"))
    newest = complete[-1]
    assert newest >= 3 and newest < 14
    uri = params["tracking"]["tracking_uri"]
    (killed,) = _child_runs(uri)
    assert killed.info.status == "RUNNING"  # SIGKILL: nobody closed it
    logged_before = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(killed.info.run_id, "val_loss")]
    # the tracker logs an epoch once its checkpoint is being written (in the background), not once written
    assert newest - 1 <= max(logged_before) <= newest + 1
    # The newest checkpoint is torn (as a crash mid-write of the file system would leave it), and a
    # next one was being written: neither may be taken for a complete checkpoint.
    torn = run_dir / checkpoint_name(newest) / STATE_FILE
    torn.write_bytes(torn.read_bytes()[:1000])
    (run_dir / checkpoint_name(newest + 1)).mkdir(exist_ok=True)
    (run_dir / checkpoint_name(newest + 1) / f"{STATE_FILE}.tmp").write_bytes(b"\0" * 100)

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"skipping unreadable checkpoint {torn}" in rerun.stderr
    result = read_run(tmp_path / "metrics", "toy", "test_resnet", 0, "full")
    assert result["resumed_at_epochs"] == [newest - 1] and result["epochs_run"] == 14
    (finished,) = _child_runs(uri)
    assert finished.info.run_id == killed.info.run_id == result["mlflow_run_id"], "resume left a second MLflow run"
    assert finished.info.status == "FINISHED"
    for key in ("val_loss", "train_loss", "lr"):
        steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(finished.info.run_id, key)]
        assert sorted(steps) == list(range(1, 15)), f"{key}: steps {sorted(steps)}: a gap or a repeat"
    curve = pd.read_csv(tmp_path / "plots" / "toy" / "test_resnet" / "full" / "seed0-random-init.csv")
    assert list(curve["epoch"]) == list(range(1, 15))
    assert not list(run_dir.glob(f"epoch_*/{STATE_FILE}.tmp")), "a .tmp checkpoint was left behind"
    assert os.path.exists(run_dir / COMPLETED_FILE)


def test_local_mode_leaves_the_callers_torch_switches_as_it_found_them(toy_splits, tmp_path):
    import torch

    settings = toy_settings(toy_splits, **{k: v for k, v in _local(toy_splits, tmp_path).items()
                                           if k in ("ray", "tracking")}, finetune={"max_epochs": 1})
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads()
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(2)
    try:
        result = run_finetune(settings, task="toy", backbone="test_vit", seed=0, metrics_dir=tmp_path / "m",
                              plots_dir=tmp_path / "p")
        assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == (before[0], True)
        # trained on ray.cpus_per_worker threads whatever the process had: the run's numbers depend on the count
        (seed,) = result if isinstance(result, list) else [result]
        assert seed["threads"] == int(settings.ray.cpus_per_worker) == 1 and torch.get_num_threads() == 2
    finally:
        torch.backends.cudnn.benchmark = before[1]
        torch.set_num_threads(before[2])


@pytest.mark.slow
def test_a_finetune_sigkilled_mid_checkpoint_write_resumes_from_the_complete_one_before_it(toy_splits, tmp_path):
    # ViT-S at 32 px: little compute, 260 MB of state with Adam's moments, so a background write is catchable
    vit = {"model": "vit_small_patch16_224", "family": "transformer", "weights": "none", "preset": "small"}
    params = _local(toy_splits, tmp_path, backbones={"vit_s": vit},
                    finetune={"max_epochs": 4, "early_stop_patience": 50, "img_size": 32, "batch_size": 8})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "transferbench.cli", "--params", str(params_file), "finetune", "--task", "toy",
               "--backbone", "vit_s", "--seed", "0", "--metrics-dir", str(tmp_path / "metrics"),
               "--plots-dir", str(tmp_path / "plots")]
    storage = tmp_path / "ray_results"
    for _ in range(3):  # the write can end between the poll and the kill: then try again (the run resumes)
        stage = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not (list(storage.glob(f"*/epoch_*/{STATE_FILE}.tmp")) and list(storage.glob(f"*/*/{STATE_FILE}"))):
            assert stage.poll() is None, f"the fine-tune ended before a write could be caught:\n{stage.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint write within 240 s"
            time.sleep(0.005)
        stage.send_signal(signal.SIGKILL)
        stage.wait(timeout=30)
        assert stage.returncode == -signal.SIGKILL
        (run_dir,) = storage.iterdir()
        complete = max(int(p.parent.name[6:]) for p in run_dir.glob(f"epoch_*/{STATE_FILE}"))
        if half_written := [int(p.parent.name[6:]) for p in run_dir.glob(f"epoch_*/{STATE_FILE}.tmp")]:
            assert half_written == [complete + 1], "the write in flight is not the one after the newest complete"
            break
    else:
        pytest.fail("three kills in a row came after the write they aimed at")

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    result = read_run(tmp_path / "metrics", "toy", "vit_s", 0, "full")
    assert result["resumed_at_epochs"][-1] == complete and result["epochs_run"] == 4
    uri = params["tracking"]["tracking_uri"]
    (finished,) = _child_runs(uri)
    assert finished.info.run_id == result["mlflow_run_id"] and finished.info.status == "FINISHED"
    for key in ("val_loss", "train_loss"):
        steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(finished.info.run_id, key)]
        assert sorted(steps) == list(range(1, 5)), f"{key}: steps {sorted(steps)}: a gap or a repeat"
    curve = pd.read_csv(tmp_path / "plots" / "toy" / "vit_s" / "full" / "seed0-random-init.csv")
    assert list(curve["epoch"]) == list(range(1, 5))
    assert not list(run_dir.glob(f"epoch_*/{STATE_FILE}.tmp")), "the half-written checkpoint was left behind"


@pytest.mark.slow
def test_a_compiled_finetune_checkpoints_and_logs_the_plain_model(toy_splits, tmp_path):
    from torch._dynamo.utils import counters

    settings = toy_settings(toy_splits, **{k: v for k, v in _local(toy_splits, tmp_path, ray={"compile": True}).items()
                                           if k in ("ray", "tracking")}, finetune={"max_epochs": 2})
    counters.clear()
    result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, metrics_dir=tmp_path / "m",
                          plots_dir=tmp_path / "p")
    assert counters["stats"]["unique_graphs"] > 0, "ray.compile: true trained an eager model"
    assert result["epochs_run"] == 2
    # the checkpoint and the logged model are the plain TaskModel: no "_orig_mod." prefix, loads strictly
    state = latest_checkpoint(Path(settings.ray.storage_path) / result["ray_run_name"])
    kind = kind_for_task(settings.task("toy"), {"classes": ["bright", "dark"]})
    plain = build_model(settings.backbone("test_resnet"), img_size=32, head=lambda n: kind.head(n, settings.finetune))
    plain.load_state_dict(state["model"])
    logged = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/model")
    assert type(logged) is type(plain) and logged.state_dict().keys() == plain.state_dict().keys()
