"""The age task kind through the real finetune stage (issue #21, items 2 and 7): the generated age task
split by individual, validated by its great-expectations suite, fine-tuned in Ray Train local mode and
tracked in a real MLflow store. It must beat predicting the training mean; MAE is logged per epoch and
selects the best epoch; the scatter plot is logged; the logged model loads back and predicts ages."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import yaml

from transferbench.config import load_settings
from transferbench.data.splits import split_task
from transferbench.data.synthetic_age import generate
from transferbench.data.validation import validate_task
from transferbench.engine.data import build_cache, read_manifests
from transferbench.engine.tasks import kind_for_task
from transferbench.engine.tasks.age import expected_age
from transferbench.errors import DataError
from transferbench.stages.finetune import run_finetune

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def age_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(generated_dir=str(tmp_path / "generated"), splits_dir=str(tmp_path / "splits"),
                       cache_dir=str(tmp_path / "cache"), reports_dir=str(tmp_path / "reports"))
    raw["ray"]["storage_path"] = str(tmp_path / "ray_results")
    raw["tracking"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
                           artifact_location=str(tmp_path / "art"), system_metrics=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    settings = load_settings(path)
    generate(tmp_path / "generated" / "synthetic_age", **settings.data.synthetic_age.model_dump())
    split_task("synthetic_age", settings.task("synthetic_age"), settings.data)
    validate_task("synthetic_age", settings.task("synthetic_age"), settings.data)
    return path


def test_age_finetune_beats_the_training_mean_and_its_model_predicts_ages(age_study):
    settings = load_settings(age_study)
    root = age_study.parent
    result = run_finetune(settings, task="synthetic_age", backbone="test_resnet", seed=0,
                          metrics_dir=root / "metrics", plots_dir=root / "plots")
    assert result["task_kind"] == "age" and result["metric"] == "mae" and result["baseline"] == "training-mean age"
    assert result["test_mae"] < 0.5 * result["baseline_score"]  # learns: well below predicting the train mean
    assert 0 <= result["test_cs5"] <= 1

    client = mlflow.MlflowClient(settings.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_mae")}
    per_epoch = [history[epoch] for epoch in range(1, result["epochs_run"] + 1)]  # one value per epoch
    assert min(per_epoch) == pytest.approx(result["val_mae"])  # the lowest val MAE picked the best epoch
    assert per_epoch[result["best_epoch"] - 1] == pytest.approx(result["val_mae"])
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "age_scatter_test.png" in plots
    curve = (root / "plots" / "synthetic_age" / "test_resnet" / "full" / "seed0-random-init.csv").read_text()
    curve = curve.splitlines()
    assert curve[0].split(",")[:4] == ["epoch", "step", "train_loss", "val_loss"] and "val_mae" in curve[0]

    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/model").eval()
    manifests = read_manifests(settings.data.splits_dir, "synthetic_age")
    kind = kind_for_task(settings.task("synthetic_age"), manifests.summary)
    import torch

    from transferbench.engine.data import CachedImages
    from transferbench.models import InputSpec

    spec = InputSpec.of(model.backbone)
    cache = build_cache(manifests, "test", kind=kind, cache_dir=Path(settings.data.cache_dir), side=spec.cache_side(64))
    images = CachedImages(cache, img_size=64, mean=spec.mean, std=spec.std, train=False)
    batch = torch.stack([images[i][0] for i in range(len(images))])
    with torch.no_grad():
        logits = model(batch).numpy()
    scores = kind.evaluate(logits, images.targets.numpy())
    assert scores["mae"] == pytest.approx(result["test_mae"], abs=1e-4)
    predicted = kind.prediction_table(["x"] * len(logits), logits, images.targets.numpy())["prediction"]
    assert np.all((predicted >= 0) & (predicted <= 69))  # the softmax mean over ages 0..max_age

    # the served model (engine.serving) answers an age in years per image (uint8 H x W x 3 arrays), as evaluation does
    served = mlflow.pyfunc.load_model(f"runs:/{result['mlflow_run_id']}/serving")
    arrays = pd.Series([np.ascontiguousarray(i.permute(1, 2, 0).numpy()) for i in images.images], dtype=object)
    ages = served.predict(pd.DataFrame({"image": arrays}))["age"].to_numpy()
    np.testing.assert_allclose(ages, expected_age(logits), atol=1e-4)


def test_an_age_outside_the_softmax_fails_validation_naming_it(age_study):
    settings = load_settings(age_study)
    train = Path(settings.data.splits_dir) / "synthetic_age" / "train.csv"
    lines = train.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    row[header.index("age")] = "120"
    train.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"expect_column_values_to_be_between\(column='age'"):
        validate_task("synthetic_age", settings.task("synthetic_age"), settings.data)
