"""Fixtures for the fine-tuning tests: small manifests + PNGs following the split contract.

Independent of transferbench.data: the images and manifests are written here, as the
split stage would write them (``<splits>/<task>/{train,val,test}.csv`` + ``summary.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transferbench.engine.cluster import connect
from transferbench.config import Settings, build

CLASSES = ("bright", "dark")
SIZES = {"train": 48, "val": 16, "test": 16}


def _image(label: str, rng: np.random.Generator, side: int, grayscale: bool) -> Image.Image:
    base = 170 if label == "bright" else 85
    pixels = np.clip(rng.normal(base, 30, size=(side, side + 8)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L")  # grayscale, like the X-rays
    return image if grayscale else image.convert("RGB")


@pytest.fixture(scope="session")
def toy_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary task 'toy' (bright vs dark noise images, some grayscale) under <root>/splits."""
    root = tmp_path_factory.mktemp("toydata")
    rng = np.random.default_rng(0)
    task_dir = root / "splits" / "toy"
    task_dir.mkdir(parents=True)
    for split, n in SIZES.items():
        rows = []
        for i in range(n):
            label = CLASSES[i % 2]
            path = root / "images" / split / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            _image(label, rng, 40, grayscale=i % 3 == 0).save(path)
            rows.append({"filename": str(path), "label": label, "group": f"g{split}{i // 2}", "location": "x"})
        pd.DataFrame(rows).to_csv(task_dir / f"{split}.csv", index=False)
    (task_dir / "summary.json").write_text(json.dumps({"classes": sorted(CLASSES)}))
    return root


def toy_settings(root: Path, **overrides: dict) -> Settings:
    """Settings for the toy task: tiny backbones, 32 px, a few epochs, stores under ``root``."""
    return build(Settings, toy_params(root, **overrides))


def toy_params(root: Path, **overrides: dict) -> dict:
    """The raw params (a params.yaml as a dict) behind ``toy_settings``."""
    raw = {
        "study": {"name": "toy-study", "tasks": ["toy"], "backbones": ["test_resnet"], "seeds": [0]},
        "data": {"splits_dir": str(root / "splits"), "cache_dir": str(root / "cache")},
        "tasks": {"toy": {"dataset": "synthetic", "metric": "balanced_accuracy", "split": {"rule": "random"}}},
        "backbones": {
            "test_resnet": {"model": "test_resnet", "family": "convnet", "weights": "none", "preset": "tiny"},
            "test_vit": {"model": "test_vit", "family": "transformer", "weights": "none", "preset": "tiny"},
        },
        "finetune": {"warmup_iters": 2, "max_epochs": 3, "img_size": 32, "batch_size": 8, "early_stop_patience": 5},
        # Local mode unless a test is about distribution (it then asks for workers).
        "ray": {"num_workers": 0, "max_failures": 2, "storage_path": str(root / "ray_results")},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlruns.db'}", "artifact_location": str(root / "mlartifacts"),
                     "system_metrics": True},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    import ray

    connect(None, num_cpus=2)
    yield
    ray.shutdown()
