"""The distributed path end to end: Ray Train worker actors on a real local Ray cluster, DDP, a
killed worker and a killed driver, and a real MLflow SQLite store (issue #4 acceptance).
Local mode (``ray.num_workers: 0``) is tested in test_local_mode.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from transferbench.training.data import CachedImages
from transferbench.training.finetune import run_finetune
from transferbench.training.ray_trainer import FINAL_FILE, KILL_MARKER, WORKER_ENV
from transferbench.training.tracking import RUN_KEY_TAG, STUDY_TAG

from .conftest import toy_settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def _stores(tmp: Path, **overrides):
    """Stores under ``tmp``; one Ray Train worker actor unless ``ray`` says otherwise (these tests are
    about the distributed path: workers, DDP, FailureConfig)."""
    return {"ray": {"num_workers": 1, "storage_path": str(tmp / "ray_results"), **overrides.get("ray", {})},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
                         "artifact_location": str(tmp / "mlartifacts")},
            **{k: v for k, v in overrides.items() if k != "ray"}}


def _child_runs(uri: str, study: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("transferbench")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{STUDY_TAG}` = '{study}' and tags.`transferbench.kind` = 'finetune'")


@pytest.fixture(scope="module")
def two_worker_run(toy_splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_workers")
    # Two loader processes per worker: augmentation forked from a Ray Train worker's thread, with DDP.
    settings = toy_settings(toy_splits, **_stores(tmp, ray={"report_interval_s": 0.5, "loader_workers": 2}))
    started = time.perf_counter()
    result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, num_workers=2,
                          metrics_dir=tmp / "metrics", plots_dir=tmp / "plots")
    return settings, tmp, result, time.perf_counter() - started


def test_two_workers_write_metrics_curves_and_a_complete_mlflow_run(two_worker_run):
    settings, tmp, result, seconds = two_worker_run
    print(f"2-worker toy finetune: {seconds:.1f}s")
    on_disk = json.loads((tmp / "metrics" / "toy" / "test_resnet" / "seed0.json").read_text())
    assert on_disk == result
    assert result["num_workers"] == 2 and result["random_init"] is True and result["weights_label"] == "random-init"
    for split in ("val", "test"):
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            assert 0.0 <= result[f"{split}_{metric}"] <= 1.0
    assert result["test_score"] == result["test_balanced_accuracy"] and result["metric"] == "balanced_accuracy"
    curve = pd.read_csv(tmp / "plots" / "toy" / "test_resnet" / "seed0.csv")
    assert list(curve["epoch"]) == list(range(1, result["epochs_run"] + 1))

    uri = settings.tracking.tracking_uri
    client = mlflow.MlflowClient(uri)
    (child,) = _child_runs(uri, "toy-study")
    assert child.info.run_id == result["mlflow_run_id"] and child.info.status == "FINISHED"
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[STUDY_TAG] == "toy-study" and parent.info.run_id == result["mlflow_parent_run_id"]
    tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
    assert (tags["random_init"], tags["weights_label"], tags["family"], tags["task"]) == \
        ("true", "random-init", "convnet", "toy")
    assert params["ray.num_workers"] == "2" and params["finetune.head_dropout"] == "0.2"
    assert params["ray.loader_workers"] == "2"
    assert params["finetune.warmup_iters"] == "2" and params["model"] == "test_resnet" and params["weights"] == "none"
    assert params["data.train_md5"] and tags["mlflow.source.git.commit"]
    # What the workers really trained on: CPU here, so fp32 and no channels-last whatever ray.* says.
    assert (result["device"], result["precision"], result["channels_last"]) == ("cpu", "fp32", False)
    assert (tags["transferbench.device"], tags["transferbench.precision"]) == ("cpu", "fp32")
    # ray.report_interval_s reaches Ray Train's processes (the workers read it from their environment).
    final = json.loads((Path(settings.ray.storage_path) / result["ray_run_name"] / FINAL_FILE).read_text())
    assert params["ray.report_interval_s"] == "0.5" and final["report_interval_s"] == 0.5
    assert final["worker_env"] == WORKER_ENV  # the malloc settings, in the environment the workers started with
    # Checkpoints are written straight into the run's directory (no upload), and Ray Train still
    # prunes them: checkpoints_to_keep (1, by val loss) plus the latest.
    run_dir = Path(settings.ray.storage_path) / result["ray_run_name"]
    kept = sorted(p.name for p in run_dir.glob("epoch_*"))
    assert 1 <= len(kept) <= 2 and f"epoch_{result['epochs_run']:04d}" in kept, kept
    assert all((run_dir / name / "state.pt").is_file() for name in kept) and not list(run_dir.glob("epoch_*/*.tmp"))
    history = client.get_metric_history(child.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == list(range(1, result["epochs_run"] + 1))
    assert {"train_loss", "val_accuracy", "lr", "test_accuracy", "test_auroc"} <= set(metrics)
    assert any(k.startswith("system/") for k in metrics), "system metrics were not logged"
    assert {d.dataset.name for d in child.inputs.dataset_inputs} == {"toy/train", "toy/val", "toy/test"}
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
    assert artifacts == {"plots/confusion_matrix_test.png", "plots/learning_curve.png"}

    # The logged model loads back and predicts what the run recorded for the test split.
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{child.info.run_id}/model").eval()
    recorded = pd.read_csv(client.download_artifacts(child.info.run_id, "predictions/test_predictions.csv",
                                                     str(tmp)))
    caches = sorted(Path(settings.data.cache_dir, "toy").glob("test-*px-*.pt"))
    images = CachedImages(caches[0], img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=False)
    with torch.no_grad():
        predicted = model(torch.stack([images[i][0] for i in range(len(images))])).argmax(1).numpy()
    classes = np.array(["bright", "dark"])
    assert list(classes[predicted]) == list(recorded["prediction"])


def test_killed_worker_resumes_from_its_checkpoint_in_the_same_mlflow_run(toy_splits, tmp_path):
    settings = toy_settings(toy_splits, **_stores(tmp_path), finetune={"max_epochs": 4})
    result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, num_workers=2,
                          metrics_dir=tmp_path / "metrics", plots_dir=tmp_path / "plots", kill_at_epoch=2, kill_rank=0)
    run_dir = Path(settings.ray.storage_path) / result["ray_run_name"]
    assert "killed rank 0" in (run_dir / KILL_MARKER).read_text()
    assert result["resumed_at_epochs"] == [2], "training restarted instead of resuming from epoch 2's checkpoint"
    assert result["epochs_run"] == 4
    runs = _child_runs(settings.tracking.tracking_uri, "toy-study")
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]], "recovery left a second MLflow run"
    history = mlflow.MlflowClient(settings.tracking.tracking_uri).get_metric_history(result["mlflow_run_id"], "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["transferbench.resumed_at_epochs"] == "2"


def test_killed_driver_run_resumes_when_the_command_is_rerun(toy_splits, tmp_path):
    from ray.train import TrainingFailedError

    settings = toy_settings(toy_splits, **_stores(tmp_path, ray={"max_failures": 0}))
    with pytest.raises(TrainingFailedError):  # no retries: the whole run dies at epoch 1
        run_finetune(settings, task="toy", backbone="test_vit", seed=1, metrics_dir=tmp_path / "m",
                     plots_dir=tmp_path / "p", kill_at_epoch=1)
    (failed,) = _child_runs(settings.tracking.tracking_uri, "toy-study")
    assert failed.info.status == "FAILED"
    result = run_finetune(settings, task="toy", backbone="test_vit", seed=1, metrics_dir=tmp_path / "m",
                          plots_dir=tmp_path / "p")
    assert result["resumed_at_epochs"] == [1] and result["mlflow_run_id"] == failed.info.run_id
    (finished,) = _child_runs(settings.tracking.tracking_uri, "toy-study")
    assert finished.info.status == "FINISHED" and finished.data.tags[RUN_KEY_TAG] == result["ray_run_name"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, payload: dict | None = None) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_mlflow_ui_server_serves_the_study_over_rest(two_worker_run):
    settings, tmp, result, _ = two_worker_run
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", settings.tracking.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail("mlflow server exited")
                time.sleep(0.5)
        experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=transferbench")
        found = _get(f"{base}/api/2.0/mlflow/runs/search", {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": "tags.`transferbench.study` = 'toy-study'"})
        runs = {r["info"]["run_id"]: r for r in found["runs"]}
        assert set(runs) == {result["mlflow_run_id"], result["mlflow_parent_run_id"]}
        child = runs[result["mlflow_run_id"]]
        metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
        history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={result['mlflow_run_id']}&metric_key=val_loss")
        assert len(history["metrics"]) == result["epochs_run"]
    finally:
        server.terminate()
        server.wait(timeout=30)
