"""MLflow Model Registry: registration, aliases and idempotence, on a real SQLite store.

Each (backbone, seed) is a real classifier on a timm test_* model logged as training logs it (the served
model, ``engine.serving``) in its own run, with designed val/test scores so the alias choices are known in advance. Load-back
of a champion from real fine-tunes is in test_registry_loadback.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from study_files import edit_result, log_served_classifier, metrics_record, write_params
from transferbench.cli import main
from transferbench.engine.run_files import read_run, records_dir, write_result

pytestmark = pytest.mark.slow

TASK = "synthetic"
STUDY = "registry-study"
MODEL_NAME = f"{STUDY}.{TASK}"
IMG_SIZE = 64  # the fine-tuning input side (params finetune.img_size in the smoke study)
# Designed validation scores: test_vit seed 1 is the champion; test_resnet seed 0 the best convnet.
VAL = {("test_resnet", 0): 0.70, ("test_resnet", 1): 0.60, ("test_vit", 0): 0.65, ("test_vit", 1): 0.80}


def _log_finetuned(root: Path, backbone: str, seed: int, val: float, experiment_id: str) -> None:
    """Log one 'fine-tuned' model as training would (its served model), and write its result (metrics and record)."""
    # Designed test scores (the real engine's load-back is in test_registry_loadback.py).
    test = {"accuracy": val - 0.05, "balanced_accuracy": val - 0.06, "macro_f1": val - 0.07}
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log_served_classifier(backbone, seed=seed, img_size=IMG_SIZE)
    record = metrics_record(TASK, backbone, seed, "accuracy", test["accuracy"], val, run_id=run.info.run_id)
    record |= {f"test_{k}": v for k, v in test.items()}
    write_result(root / "metrics", record)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two backbones x two seeds logged once per module to a SQLite MLflow store (exporting is slow)."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.create_experiment("finetune", artifact_location=(root / "artifacts").as_uri())
        for (backbone, seed), val in VAL.items():
            _log_finetuned(root, backbone, seed, val, experiment_id)
    finally:
        mlflow.set_tracking_uri(None)
    return root, experiment_id


@pytest.fixture
def trained(logged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private copy of the logged store, metrics and records (artifacts stay shared, read-only) and its params."""
    root, experiment_id = logged
    monkeypatch.chdir(tmp_path)
    shutil.copy(root / "mlruns.db", tmp_path / "mlruns.db")
    shutil.copytree(root / "metrics", tmp_path / "metrics")
    shutil.copytree(records_dir(root / "metrics"), records_dir(tmp_path / "metrics"))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    params = write_params(tmp_path, tasks={TASK: "accuracy"}, backbones=["test_resnet", "test_vit"], seeds=[0, 1],
                          study=STUDY, tracking_uri=uri)
    yield params, MlflowClient(tracking_uri=uri, registry_uri=uri), experiment_id
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _versions(client: MlflowClient) -> dict[str, str]:
    return {v.version: v.tags["backbone"] for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}


def test_register_sets_aliases_and_is_idempotent(trained, capsys):
    params, client, experiment_id = trained
    assert main(["--params", str(params), "register"]) == 0
    versions = _versions(client)
    assert sorted(versions.values()) == ["test_resnet", "test_vit"]  # one version per (task, backbone)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.tags["backbone"] == "test_vit" and champion.tags["seed"] == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "best-transformer").version == champion.version
    best_convnet = client.get_model_version_by_alias(MODEL_NAME, "best-convnet")
    assert best_convnet.tags["backbone"] == "test_resnet" and best_convnet.tags["seed"] == "0"
    recorded = read_run(params.parent / "metrics", TASK, "test_vit", 1)
    assert champion.run_id == recorded["mlflow_run_id"]
    assert champion.source == f"models:/{champion.tags['logged_model_id']}"  # the MLflow 3 LoggedModel
    for key, value in {"family": "transformer", "task": TASK, "weights": "none", "data_version": "md5:abc",
                       "git_commit": "deadbeef", "val_accuracy": "0.8",
                       "test_accuracy": repr(recorded["test_accuracy"])}.items():
        assert champion.tags[key] == value, key

    # unchanged results: no new versions, aliases where they were
    assert main(["--params", str(params), "register"]) == 0
    assert _versions(client) == versions
    assert "(unchanged)" in capsys.readouterr().out
    summary = json.loads((params.parent / "reports" / "registry.json").read_text())
    assert [row["created"] for row in summary] == [False, False]

    # a better convnet result (a new run) becomes a new version, takes the champion alias, keeps history
    _log_finetuned(params.parent, "test_resnet", 1, 0.95, experiment_id)
    assert main(["--params", str(params), "register"]) == 0
    after = _versions(client)
    assert len(after) == 3 and set(versions.items()) <= set(after.items())
    new_champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert new_champion.tags["backbone"] == "test_resnet" and new_champion.tags["seed"] == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "best-convnet").version == new_champion.version
    assert client.get_model_version_by_alias(MODEL_NAME, "best-transformer").version == champion.version


def test_register_fails_clearly_when_the_run_is_unknown(trained, capsys):
    params, *_ = trained
    edit_result(params.parent / "metrics", TASK, "test_vit", 1, mlflow_run_id="f" * 32)
    assert main(["--params", str(params), "register"]) == 2
    assert f"MLflow run {'f' * 32} not found" in capsys.readouterr().err


RACE = """
import sys, time
import mlflow, transferbench.stages.register  # imported before the start instant
from transferbench.cli import main
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
sys.exit(main(["--params", sys.argv[1], "register"]))
"""


def test_two_register_processes_at_once_make_one_version_each_and_agree_on_the_aliases(trained):
    """``dvc queue start -j 2`` runs two register stages on one SQLite store: real processes, started at one instant."""
    params, client, _ = trained
    start = time.time() + 10  # both have imported MLflow by then
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(params), str(start)], cwd=params.parent,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for racer in racers:
        _, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err[-3000:]
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert sorted(v.tags["backbone"] for v in versions) == ["test_resnet", "test_vit"]  # no duplicate version
    by_number = {v.version: v.tags["backbone"] for v in versions}
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert {a: by_number[v] for a, v in aliases.items()} == {
        "champion": "test_vit", "best-transformer": "test_vit", "best-convnet": "test_resnet"}
