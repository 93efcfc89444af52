"""Dense and multi-task evaluations through the real stages (issue #22): the generated dense dataset and the two
classification domains split and validated by their great-expectations suites, fine-tuned in Ray Train local mode
with the iteration-based protocol of params.yaml's smoke study and tracked in a real MLflow store.

Each must learn (beat the kind's trivial predictor), log per-iteration curves and prediction figures, and log a
model that loads back and predicts a mask; multi-task runs report every component and route images."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from transferbench.config import load_settings
from transferbench.data.splits import split_task
from transferbench.data.validation import validate_task
from transferbench.engine.data import CachedImages, build_cache, read_manifests
from transferbench.engine.run_files import read_run, record_path, result_path
from transferbench.engine.tasks import kind_for_task
from transferbench.models import InputSpec
from transferbench.stages import finetune, finetune_multitask, generate_synthetic

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dense_study")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(generated_dir=str(root / "generated"), splits_dir=str(root / "splits"),
                       cache_dir=str(root / "cache"), reports_dir=str(root / "reports"))
    raw["ray"]["storage_path"] = str(root / "ray_results")
    raw["tracking"].update(tracking_uri=f"sqlite:///{root / 'mlruns.db'}", artifact_location=str(root / "art"),
                           system_metrics=False)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    settings = load_settings(path)
    for dataset in ("synthetic_dense", "synthetic", "synthetic_b"):
        generate_synthetic.run(settings, dataset)
    for task in ("synthetic_seg", "synthetic_depth", "synthetic", "synthetic_b"):
        split_task(task, settings.task(task), settings.data)
        validate_task(task, settings.task(task), settings.data)
    return path


def _run(path: Path, task: str, backbone: str) -> dict:
    settings = load_settings(path)
    root = path.parent
    stage = finetune_multitask.each_run if settings.task(task).kind == "multitask" else finetune.each_seed
    (result,) = stage(settings, task=task, backbone=backbone, metrics_dir=root / "metrics", plots_dir=root / "plots")
    return result


def test_segmentation_on_a_plain_vit_learns_logs_per_iteration_and_its_model_predicts_masks(dense_study):
    settings = load_settings(dense_study)
    result = _run(dense_study, "synthetic_seg", "test_vit")  # the ViT pyramid adapter under UPerNet
    assert result["task_kind"] == "segmentation" and result["metric"] == "miou"
    assert result["baseline"] == "majority-class mask"
    assert result["test_miou"] > result["baseline_score"] + 0.2, (result["test_miou"], result["baseline_score"])
    assert result["stop_reason"] == "max_iters"

    protocol = settings.finetune_for("test_vit", "synthetic_seg")
    client = mlflow.MlflowClient(settings.tracking.tracking_uri)
    run_id = result["mlflow_run_id"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    assert steps == list(range(protocol.eval_every, protocol.max_iters + 1, protocol.eval_every))  # iterations
    params = client.get_run(run_id).data.params
    assert params["finetune.schedule"] == "poly" and params["finetune.optimizer"] == "adamw"
    plots = {Path(a.path).name for a in client.list_artifacts(run_id, "plots")}
    assert {"segmentation_test.png", "learning_curve.png"} <= plots

    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()
    manifests = read_manifests(settings.data.splits_dir, "synthetic_seg")
    kind = kind_for_task(settings.task("synthetic_seg"), manifests.summary)
    spec = InputSpec.of(model.backbone)
    size = protocol.img_size
    cache = build_cache(manifests, "test", kind=kind, side=spec.cache_side(size), cache_dir=settings.data.cache_dir)
    data = CachedImages(cache, img_size=size, mean=spec.mean, std=spec.std, train=False)
    images = torch.stack([data[i][0] for i in range(len(data))])
    targets = torch.stack([data[i][1] for i in range(len(data))]).numpy()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (len(data), 4, size, size)  # a mask's logits at the input size
    assert kind.evaluate(kind.reduce(logits).numpy(), targets)["miou"] == pytest.approx(result["test_miou"], abs=1e-4)

    # the served model (engine.serving) answers each test image, given as a uint8 H x W x 3 array, with its mask
    answers = _served(run_id, data.images)
    masks = np.stack([a["mask"] for a in answers])
    assert masks.shape == (len(data), size, size)
    assert (masks == kind.reduce(logits).numpy()).mean() > 0.999  # the engine's own masks (argmax ties aside)


def _served(run_id: str, images: torch.Tensor) -> list[dict]:
    """The run's served model (``serving``, a pyfunc) on uint8 (N, 3, H, W) images given as H x W x 3 arrays."""
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/serving")
    frame = pd.DataFrame({"image": pd.Series([np.ascontiguousarray(i.permute(1, 2, 0).numpy()) for i in images],
                                             dtype=object)})
    return model.predict(frame).to_dict("records")


def test_depth_learns_below_the_mean_training_depth(dense_study):
    result = _run(dense_study, "synthetic_depth", "test_resnet")
    assert result["baseline"] == "mean training depth"
    assert result["test_rmse"] < 0.8 * result["baseline_score"], (result["test_rmse"], result["baseline_score"])
    assert 0 < result["test_delta1"] <= 1 and result["test_absrel"] > 0


def test_segmentation_and_depth_train_one_backbone_with_two_heads(dense_study):
    result = _run(dense_study, "synthetic_seg_depth", "test_resnet")
    assert result["task_kind"] == "multitask" and result["metric"] == "loss"
    seg, depth = result["components"]
    assert (seg["task"], seg["metric"], seg["higher_is_better"]) == ("synthetic_seg", "miou", True)
    assert (depth["task"], depth["metric"], depth["higher_is_better"]) == ("synthetic_depth", "rmse", False)
    assert seg["test_score"] == result["test_synthetic_seg.miou"] > 0.5
    assert 0 < depth["test_score"] == result["test_synthetic_depth.rmse"]
    # on disk: the per-component scores in the metrics file (by component task), what they are in the record
    root = dense_study.parent
    assert read_run(root / "metrics", "synthetic_seg_depth", "test_resnet", result["seed"], result["mode"]) == result
    metrics_file = result_path(root / "metrics", "synthetic_seg_depth", "test_resnet", result["seed"], result["mode"])
    assert json.loads(metrics_file.read_text())["components"] == {
        c["task"]: {"val_score": c["val_score"], "test_score": c["test_score"]} for c in (seg, depth)}
    record = json.loads(record_path(root / "metrics", metrics_file).read_text())
    assert record["components"] == [{k: c[k] for k in ("task", "kind", "metric", "higher_is_better")}
                                    for c in (seg, depth)]
    client = mlflow.MlflowClient(load_settings(dense_study).tracking.tracking_uri)
    plots = {Path(a.path).name for a in client.list_artifacts(result["mlflow_run_id"], "plots")}
    assert {"synthetic_seg_segmentation_test.png", "synthetic_depth_depth_test.png"} <= plots

    settings = load_settings(dense_study)
    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    cache = next((Path(settings.data.cache_dir) / "synthetic_seg_depth").glob("test-*.pt"))
    [answer] = _served(result["mlflow_run_id"], torch.load(cache, weights_only=True)["images"][:1])
    size = settings.finetune_for("test_resnet", "synthetic_seg_depth").img_size
    assert set(answer) == {"synthetic_seg", "synthetic_depth"}  # one answer per head
    assert answer["synthetic_seg"]["mask"].shape == answer["synthetic_depth"]["depth"].shape == (size, size)
    dense = settings.task("synthetic_depth").dense
    assert dense.min_depth <= answer["synthetic_depth"]["depth"].min() <= answer["synthetic_depth"]["depth"].max() \
        <= dense.max_depth


def test_two_mixed_datasets_are_routed_to_their_heads(dense_study):
    result = _run(dense_study, "synthetic_mixed", "test_resnet")
    assert result["test_routing_accuracy"] > 0.9  # the light and dark backgrounds tell the datasets apart
    first, second = result["components"]
    assert (first["task"], second["task"]) == ("synthetic", "synthetic_b")
    assert first["test_score"] > 0.6 and first["test_score"] == result["test_synthetic.accuracy"]

    settings = load_settings(dense_study)
    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    cache = next((Path(settings.data.cache_dir) / "synthetic_mixed").glob("test-*.pt"))
    answers = _served(result["mlflow_run_id"], torch.load(cache, weights_only=True)["images"][:4])
    for answer in answers:  # each head's answer, and the dataset the router sends the image to
        assert answer["router"]["component"] in ("synthetic", "synthetic_b") and answer["router"]["probability"] >= 0.5
        assert sum(answer["synthetic"]["probabilities"].values()) == pytest.approx(1.0)


def test_a_backbone_the_task_does_not_list_gets_no_run_and_a_note(dense_study):
    settings = load_settings(dense_study)
    root = dense_study.parent
    assert list(finetune.each_seed(settings, task="synthetic_seg", backbone="test_convnext",
                                   metrics_dir=root / "metrics", plots_dir=root / "plots")) == []
    # the metrics directory says only that it is skipped (dvc metrics show: skipped 1); the record says why
    assert [p.name for p in (root / "metrics" / "synthetic_seg" / "test_convnext").iterdir()] == ["skipped.json"]
    assert json.loads((root / "metrics" / "synthetic_seg" / "test_convnext" / "skipped.json").read_text()) == \
        {"skipped": 1}
    note = json.loads((root / "metrics.runs" / "synthetic_seg" / "test_convnext" / "skipped.json").read_text())
    assert note["skipped"] is True and "test_resnet, test_vit" in note["reason"]
    assert (note["task"], note["backbone"]) == ("synthetic_seg", "test_convnext")
    assert not list((root / "plots" / "synthetic_seg" / "test_convnext").iterdir())


def test_a_multitask_task_refuses_component_settings_its_split_did_not_record(dense_study):
    from transferbench.engine.inputs import combine_manifests
    from transferbench.errors import DataError

    settings = load_settings(dense_study)
    components = {c: settings.task(c) for c in settings.task("synthetic_seg_depth").components}
    assert combine_manifests(settings.data, "synthetic_seg_depth", components).summary["mixed"] is False
    edited = components["synthetic_depth"].model_copy(update={"metric": "absrel"})
    with pytest.raises(DataError, match=r"tasks\.synthetic_depth in params differs .*`dvc repro split@synthetic_depth`"):
        combine_manifests(settings.data, "synthetic_seg_depth", {**components, "synthetic_depth": edited})
