"""MLflow Model Registry: registration, aliases, idempotence and load-back, on a real SQLite store.

Each (backbone, seed) is a real timm test_* model logged with ``mlflow.pytorch.log_model`` in
its own run; its recorded test metrics come from evaluating it on a small generated test split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import timm
import torch
from mlflow import MlflowClient
from PIL import Image

from study_files import metrics_record, write_params
from transferbench.cli import main
from transferbench.evaluation.metrics import data_config, evaluate_manifest

pytestmark = pytest.mark.slow

TASK = "synthetic"
STUDY = "registry-study"
MODEL_NAME = f"{STUDY}.{TASK}"
IMG_SIZE = 64  # the fine-tuning input side (params finetune.img_size in the smoke study)
# Designed validation scores: test_vit seed 1 is the champion; test_resnet seed 0 the best convnet.
VAL = {("test_resnet", 0): 0.70, ("test_resnet", 1): 0.60, ("test_vit", 0): 0.65, ("test_vit", 1): 0.80}


def _write_test_split(root: Path) -> Path:
    """A 2-class test manifest of generated PNGs (filename,label,group + summary.json)."""
    split = root / "splits" / TASK
    (split / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["filename,label,group"]
    for i in range(12):
        label = ("circle", "square")[i % 2]
        pixels = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        pixels[..., i % 2] = 255 if label == "square" else 0  # a learnable-looking colour cue
        Image.fromarray(pixels).save(split / "images" / f"img{i}.png")
        rows.append(f"images/img{i}.png,{label},g{i // 2}")
    (split / "test.csv").write_text("\n".join(rows) + "\n")
    (split / "summary.json").write_text(json.dumps({"classes": ["circle", "square"]}))
    return split / "test.csv"


def _log_finetuned(root: Path, manifest: Path, backbone: str, seed: int, val: float, experiment_id: str) -> None:
    """Log one 'fine-tuned' model as training would, and write its metrics JSON."""
    torch.manual_seed(seed + 100 * len(backbone))
    model = timm.create_model(backbone, num_classes=2, **({"img_size": IMG_SIZE} if "vit" in backbone else {}))
    model.eval()  # MLflow 3's default pt2 format exports the module in its current (eval) mode
    test = evaluate_manifest(model, manifest, config=data_config(backbone, IMG_SIZE))
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.pytorch.log_model(model, name="model", input_example=torch.zeros(2, 3, IMG_SIZE, IMG_SIZE).numpy(),
                                 pip_requirements=["torch", "timm"])
    record = metrics_record(TASK, backbone, seed, "accuracy", test["accuracy"], val, run_id=run.info.run_id)
    record |= {f"test_{k}": v for k, v in test.items()}
    path = root / "metrics" / TASK / backbone / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two backbones x two seeds logged once per module to a SQLite MLflow store (exporting is slow)."""
    root = tmp_path_factory.mktemp("logged")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = mlflow.create_experiment("finetune", artifact_location=(root / "artifacts").as_uri())
        manifest = _write_test_split(root)
        for (backbone, seed), val in VAL.items():
            _log_finetuned(root, manifest, backbone, seed, val, experiment_id)
    finally:
        mlflow.set_tracking_uri(None)
    return root, manifest, experiment_id


@pytest.fixture
def trained(logged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private copy of the logged store and metrics (artifacts stay shared, read-only) and its params."""
    root, manifest, experiment_id = logged
    monkeypatch.chdir(tmp_path)
    shutil.copy(root / "mlruns.db", tmp_path / "mlruns.db")
    shutil.copytree(root / "metrics", tmp_path / "metrics")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    params = write_params(tmp_path, tasks={TASK: "accuracy"}, backbones=["test_resnet", "test_vit"], seeds=[0, 1],
                          study=STUDY, tracking_uri=uri)
    yield params, manifest, MlflowClient(tracking_uri=uri, registry_uri=uri), experiment_id
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _versions(client: MlflowClient) -> dict[str, str]:
    return {v.version: v.tags["backbone"] for v in client.search_model_versions(f"name = '{MODEL_NAME}'")}


def test_register_sets_aliases_and_is_idempotent(trained, capsys):
    params, manifest, client, experiment_id = trained
    assert main(["--params", str(params), "register"]) == 0
    versions = _versions(client)
    assert sorted(versions.values()) == ["test_resnet", "test_vit"]  # one version per (task, backbone)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.tags["backbone"] == "test_vit" and champion.tags["seed"] == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "best-transformer").version == champion.version
    best_convnet = client.get_model_version_by_alias(MODEL_NAME, "best-convnet")
    assert best_convnet.tags["backbone"] == "test_resnet" and best_convnet.tags["seed"] == "0"
    recorded = json.loads((params.parent / "metrics" / TASK / "test_vit" / "seed1.json").read_text())
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
    _log_finetuned(params.parent, manifest, "test_resnet", 1, 0.95, experiment_id)
    assert main(["--params", str(params), "register"]) == 0
    after = _versions(client)
    assert len(after) == 3 and set(versions.items()) <= set(after.items())
    new_champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert new_champion.tags["backbone"] == "test_resnet" and new_champion.tags["seed"] == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "best-convnet").version == new_champion.version
    assert client.get_model_version_by_alias(MODEL_NAME, "best-transformer").version == champion.version


def test_champion_loads_back_and_reproduces_its_test_metric(trained):
    params, manifest, client, _ = trained
    assert main(["--params", str(params), "register"]) == 0
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    model = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}@champion")
    scores = evaluate_manifest(model, manifest, config=data_config(champion.tags["model"], IMG_SIZE))
    recorded = json.loads((params.parent / "metrics" / TASK / champion.tags["backbone"]
                           / f"seed{champion.tags['seed']}.json").read_text())
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert scores[metric] == pytest.approx(recorded[f"test_{metric}"], abs=1e-9), metric
        assert float(champion.tags[f"test_{metric}"]) == pytest.approx(scores[metric], abs=1e-9)


def test_register_fails_clearly_when_the_run_is_unknown(trained, capsys):
    params, *_ = trained
    path = params.parent / "metrics" / TASK / "test_vit" / "seed1.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "mlflow_run_id": "f" * 32}))
    assert main(["--params", str(params), "register"]) == 2
    assert f"MLflow run {'f' * 32} not found" in capsys.readouterr().err
