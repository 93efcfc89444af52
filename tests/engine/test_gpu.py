"""The engine's GPU path on a real local Ray cluster (``ray.use_gpu``): skipped without CUDA.

Run on a GPU machine with ``pytest -m gpu``. CI has no GPU: these tests are skipped there, and
the CPU side of the same records (device ``cpu``, ``fp32``) is checked by test_ray_finetune.
"""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
import torch

from transferbench.stages.finetune import run_finetune

from .conftest import toy_settings
from .test_ray_workers import _child_runs, _stores

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("ray_cluster")]


def _gpu_run(toy_splits, tmp, backbone: str, seed: int = 0, **ray: object) -> dict:
    settings = toy_settings(toy_splits, **_stores(tmp, ray={"use_gpu": True, **ray}))
    return run_finetune(settings, task="toy", backbone=backbone, seed=seed, metrics_dir=tmp / "metrics",
                        plots_dir=tmp / "plots")


@pytest.mark.parametrize(("backbone", "mixed_precision", "channels_last", "loader_workers", "num_workers",
                          "expected"), [
    ("test_resnet", True, True, 0, 1, ("bf16-autocast", True)),
    ("test_resnet", True, True, 0, 0, ("bf16-autocast", True)),  # Ray Train local mode
    ("test_vit", True, True, 2, 1, ("bf16-autocast", False)),  # channels-last is for ConvNets only
    ("test_vit", True, True, 2, 0, ("bf16-autocast", False)),
    ("test_resnet", False, False, 0, 1, ("fp32", False)),
])
def test_a_gpu_run_trains_on_the_gpu_in_the_precision_asked_for(toy_splits, tmp_path, backbone, mixed_precision,
                                                                  channels_last, loader_workers, num_workers,
                                                                  expected):
    result = _gpu_run(toy_splits, tmp_path, backbone, mixed_precision=mixed_precision, channels_last=channels_last,
                      loader_workers=loader_workers, num_workers=num_workers)
    assert result["device"] == torch.cuda.get_device_name(0)
    assert (result["precision"], result["channels_last"]) == expected
    assert result["epochs_run"] == 3 and math.isfinite(result["best_val_loss"])
    for split in ("val", "test"):
        assert 0.0 <= result[f"{split}_balanced_accuracy"] <= 1.0
    (child,) = _child_runs(f"sqlite:///{tmp_path / 'mlruns.db'}", "toy-study")
    assert child.data.tags["transferbench.device"] == result["device"]
    assert child.data.tags["transferbench.precision"] == expected[0]
    assert child.data.params["ray.use_gpu"] == "True"
    # The logged model was trained on the GPU and loads on a CPU-only reader.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{child.info.run_id}/model", map_location="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_the_same_seed_on_gpu_gives_the_same_losses(toy_splits, tmp_path):
    """Deterministic algorithms (and cuBLAS's fixed workspace) make a GPU run repeatable."""
    curves = []
    for run in ("a", "b"):
        result = _gpu_run(toy_splits, tmp_path / run, "test_resnet", seed=3)
        assert result["precision"] == "bf16-autocast"
        curves.append(pd.read_csv(tmp_path / run / "plots" / "toy" / "test_resnet" / "full" / "seed3-random-init.csv"))
    pd.testing.assert_frame_equal(curves[0], curves[1], check_exact=True)
