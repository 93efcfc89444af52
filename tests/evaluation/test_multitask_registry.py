"""The registry and a multitask task (issue #22), on a real SQLite MLflow store.

A multitask task is ONE registered model, ``<study>.<multitask task>``, one version per backbone it ran
(here 2 of the study's 4), its best seed chosen by the multitask selection metric: the summed val loss,
lower is better (not one model per component column). Each run logs a served stand-in model on a real timm test_* backbone,
as in test_model_registry.py, with designed val losses.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from study_files import log_served_classifier, multitask_record
from transferbench.engine.run_files import write_result
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.registry import register_study
from transferbench.evaluation.results import EvaluationSpec, read_study_results

pytestmark = pytest.mark.slow

STUDY = "mt-registry-study"
TASK = "seg_cls"  # components: a segmentation stand-in and a classification task
IMG_SIZE = 64
STUDY_BACKBONES = {"test_resnet": "convnet", "test_convnext": "convnet", "test_vit": "transformer",
                   "test_vit2": "transformer"}
# Designed val losses (lower is better): test_vit seed 0 is the champion; test_resnet seed 1 the best convnet.
# The components' own val scores point the other way, so a per-component choice would differ.
VAL_LOSS = {("test_resnet", 0): 0.90, ("test_resnet", 1): 0.70, ("test_vit", 0): 0.50, ("test_vit", 1): 0.80}
VAL_MIOU = {("test_resnet", 0): 0.60, ("test_resnet", 1): 0.30, ("test_vit", 0): 0.20, ("test_vit", 1): 0.50}


@pytest.fixture
def logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = mlflow.create_experiment("finetune", artifact_location=(tmp_path / "artifacts").as_uri())
    for (backbone, seed), val_loss in VAL_LOSS.items():
        with mlflow.start_run(experiment_id=experiment_id) as run:  # a stand-in model: the choice is the test
            log_served_classifier(backbone, seed=seed, img_size=IMG_SIZE)
        components = [
            {"task": "seg", "kind": "segmentation", "metric": "miou", "higher_is_better": True,
             "val_score": VAL_MIOU[backbone, seed], "test_score": VAL_MIOU[backbone, seed] - 0.02},
            {"task": "cls", "kind": "classification", "metric": "accuracy", "higher_is_better": True,
             "val_score": 0.9, "test_score": 0.85}]
        write_result(tmp_path / "metrics", multitask_record(TASK, backbone, seed, components, val_loss=val_loss,
                                                            run_id=run.info.run_id, test_routing_accuracy=1.0))
    yield tmp_path, MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def test_a_multitask_task_registers_one_model_chosen_by_val_loss_on_the_backbones_it_ran(logged):
    root, client = logged
    # the multitask model as a whole (what register reads): metric loss, on 2 of the study's 4 backbones
    spec = EvaluationSpec(TASK, "full", "loss", (0, 1), backbones=("test_resnet", "test_vit"))
    results = read_study_results(root / "metrics", evaluations={TASK: spec}, backbones=STUDY_BACKBONES)
    assert len(results) == 4 and {r.component for r in results} == {None}
    metrics = {TASK: MetricSpec("loss", higher_is_better=False)}

    rows = register_study(client, results, metrics=metrics, study=STUDY)
    name = f"{STUDY}.{TASK}"
    assert [m.name for m in client.search_registered_models()] == [name]  # one model, not one per component
    assert sorted((r["backbone"], r["seed"]) for r in rows) == [("test_resnet", 1), ("test_vit", 0)]
    champion = client.get_model_version_by_alias(name, "champion")
    assert (champion.tags["backbone"], champion.tags["seed"]) == ("test_vit", "0")  # val loss 0.50
    assert champion.tags["selection_metric"] == "loss"
    assert champion.tags["selected_by"] == "best val_loss over seeds [0, 1]"
    assert champion.tags["val_loss"] == "0.5" and champion.tags["test_seg.miou"] == repr(0.2 - 0.02)
    assert champion.tags["test_routing_accuracy"] == "1.0"
    best_convnet = client.get_model_version_by_alias(name, "best-convnet")
    assert (best_convnet.tags["backbone"], best_convnet.tags["seed"]) == ("test_resnet", "1")  # 0.70 < 0.90
    assert client.get_model_version_by_alias(name, "best-transformer").version == champion.version

    # idempotent: the same results register nothing new
    again = register_study(client, results, metrics=metrics, study=STUDY)
    assert [r["created"] for r in again] == [False, False]
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
