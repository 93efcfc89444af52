"""The distributed path end to end: Ray Train worker actors on a real local Ray cluster, DDP, a
worker SIGKILLed from outside, and a real MLflow SQLite store. Local mode (``ray.num_workers: 0``)
is tested in test_local_mode.py; a killed driver in tests/cluster/test_scale_out.py."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch

from transferbench.engine.data import CachedImages
from transferbench.engine.run_files import read_run
from transferbench.engine.spec import REPORT_INTERVAL_ENV, WORKER_ENV
from transferbench.engine.tracking import STUDY_TAG
from transferbench.stages.finetune import run_finetune

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


def _train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if any("RayTrainWorker" in part for part in [p.info["name"] or "", *(p.info["cmdline"] or [])])]


class _Watching(threading.Thread):
    """Beside a run in this process: every 0.1 s, ``look(workers)`` at its Ray Train worker processes,
    until it returns True or the run is over."""

    def __init__(self, look) -> None:
        super().__init__(daemon=True)
        self.look, self.done = look, threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and not self.look(_train_workers()):
            time.sleep(0.1)


@pytest.fixture(scope="module")
def two_worker_run(toy_splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_workers")
    # Two loader processes per worker: augmentation forked from a Ray Train worker's thread, with DDP.
    settings = toy_settings(toy_splits, **_stores(tmp, ray={"report_interval_s": 0.5, "loader_workers": 2}))
    environments: dict[int, dict[str, str]] = {}

    def read_environments(workers: list[psutil.Process]) -> bool:  # what each worker process started with
        for worker in workers:
            try:
                environments.setdefault(worker.pid, worker.environ())
            except psutil.Error:
                pass
        return False

    watcher = _Watching(read_environments)
    watcher.start()
    started = time.perf_counter()
    try:
        result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, num_workers=2,
                              metrics_dir=tmp / "metrics", plots_dir=tmp / "plots")
    finally:
        watcher.done.set()
    return settings, tmp, result, time.perf_counter() - started, environments


def test_two_workers_write_metrics_curves_and_a_complete_mlflow_run(two_worker_run):
    settings, tmp, result, seconds, environments = two_worker_run
    print(f"2-worker toy finetune: {seconds:.1f}s")
    on_disk = read_run(tmp / "metrics", "toy", "test_resnet", 0, "full")
    assert on_disk == result
    assert result["num_workers"] == 2 and result["random_init"] is True and result["weights_label"] == "random-init"
    for split in ("val", "test"):
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            assert 0.0 <= result[f"{split}_{metric}"] <= 1.0
    assert result["test_score"] == result["test_balanced_accuracy"] and result["metric"] == "balanced_accuracy"
    curve = pd.read_csv(tmp / "plots" / "toy" / "test_resnet" / "full" / "seed0-random-init.csv")
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
    # The worker processes started with the malloc settings and ray.report_interval_s (read from
    # /proc while they trained: what glibc and Ray Train read when the process starts).
    assert params["ray.report_interval_s"] == "0.5" and len(environments) >= 2, environments.keys()
    for environment in environments.values():
        assert {k: environment.get(k) for k in WORKER_ENV} == WORKER_ENV
        assert float(environment[REPORT_INTERVAL_ENV]) == 0.5
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


def test_a_worker_killed_from_outside_resumes_from_its_checkpoint_in_the_same_mlflow_run(toy_splits, tmp_path):
    epochs = 8
    settings = toy_settings(toy_splits, **_stores(tmp_path), finetune={"max_epochs": epochs,
                                                                       "early_stop_patience": 50})
    storage = Path(settings.ray.storage_path)
    killed: list[int] = []

    def kill_after_second_checkpoint(workers: list[psutil.Process]) -> bool:
        if not list(storage.glob("*/epoch_0002/state.pt")) or not workers:
            return False
        workers[0].send_signal(signal.SIGKILL)  # a worker process dies, as on a lost machine
        killed.append(workers[0].pid)
        return True

    watcher = _Watching(kill_after_second_checkpoint)
    watcher.start()
    try:
        result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, num_workers=2,
                              metrics_dir=tmp_path / "metrics", plots_dir=tmp_path / "plots")
    finally:
        watcher.done.set()
    assert killed, "the run finished before a worker could be killed"
    # Ray resumes from the checkpoint it had registered: epoch 2's, or epoch 1's if the kill came between
    # epoch 2's file and its report; never from scratch.
    (resumed_at,) = result["resumed_at_epochs"]
    assert resumed_at >= 1, "training restarted from scratch instead of from a checkpoint"
    assert result["epochs_run"] == epochs
    runs = _child_runs(settings.tracking.tracking_uri, "toy-study")
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]], "recovery left a second MLflow run"
    client = mlflow.MlflowClient(settings.tracking.tracking_uri)
    for key in ("val_loss", "train_loss"):
        steps = sorted(m.step for m in client.get_metric_history(result["mlflow_run_id"], key))
        assert steps == list(range(1, epochs + 1)), f"{key}: a gap or a repeat after the recovery: {steps}"
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["transferbench.resumed_at_epochs"] == str(resumed_at)


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
    settings, tmp, result, _, _ = two_worker_run
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
