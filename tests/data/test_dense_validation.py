"""great-expectations validation of a dense task (segmentation, depth): the synthetic_dense data passes; a
mask holding a class above dense.num_classes, a depth map without a reading, a missing or resized file
each fail, naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transferbench.config import DataSettings, TaskSettings
from transferbench.data.layout import manifest_path
from transferbench.data.splits import split_task
from transferbench.data.synthetic_dense import generate
from transferbench.data.validation import validate_task
from transferbench.errors import DataError

pytestmark = pytest.mark.slow  # great-expectations takes a few seconds per run

CLASSES = ("circle", "square", "triangle")


def _task(kind: str) -> TaskSettings:
    return TaskSettings(dataset="synthetic_dense", kind=kind, metric="miou" if kind == "segmentation" else "rmse",
                        split={"rule": "random"}, dense={"num_classes": len(CLASSES) + 1})


@pytest.fixture
def dense(project):
    """synthetic_dense generated and split for a segmentation task; returns (task, data settings)."""
    data = DataSettings()  # relative paths: inside the temporary project
    generate(Path(data.generated_dir) / "synthetic_dense", images=40, classes=CLASSES, image_size=32)
    task = _task("segmentation")
    split_task("dense", task, data)
    return task, data


def _first(data, split: str, column: str) -> str:
    return pd.read_csv(manifest_path(data, "dense", split), dtype=str)[column].iloc[0]


@pytest.mark.parametrize("kind", ["segmentation", "depth"])
def test_dense_splits_pass_and_carry_mask_and_depth(dense, kind):
    _, data = dense
    train = pd.read_csv(manifest_path(data, "dense", "train"), dtype=str)
    assert {"mask", "depth"} <= set(train.columns) and Path(train["mask"].iloc[0]).is_file()
    report = validate_task("dense", _task(kind), data)
    assert report["success"]
    checked = {(r["suite"], r["kwargs"].get("column")) for r in report["results"]}
    assert {("train", "mask_check"), ("test", "depth_check"), ("val", "mask")} <= checked


def test_a_mask_class_above_num_classes_fails_naming_the_file(dense):
    task, data = dense
    victim = _first(data, "val", "mask")
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[0, 0] = task.dense.num_classes + 1
    Image.fromarray(pixels).save(victim)
    with pytest.raises(DataError) as info:
        validate_task("dense", task, data)
    message = str(info.value)
    assert "column='mask_check'" in message and victim in message and "5 > dense.num_classes=4" in message


def test_a_depth_map_without_a_reading_fails_naming_the_file(dense):
    task, data = dense
    victim = _first(data, "train", "depth")
    Image.fromarray(np.zeros((32, 32), dtype=np.uint16)).save(victim)
    with pytest.raises(DataError) as info:
        validate_task("dense", task, data)
    message = str(info.value)
    assert "column='depth_check'" in message and victim in message and "no valid pixel" in message


def test_missing_resized_and_wrong_format_files_fail_naming_them(dense):
    task, data = dense
    missing, resized = _first(data, "train", "mask"), _first(data, "test", "depth")
    wrong = _first(data, "val", "depth")
    Path(missing).unlink()
    Image.fromarray(np.full((16, 32), 2000, dtype=np.uint16)).save(resized)
    Image.new("L", (32, 32), 20).save(wrong)  # 8-bit, not 16-bit millimetres
    with pytest.raises(DataError) as info:
        validate_task("dense", task, data)
    message = str(info.value)
    assert f"missing: no mask file at {missing}" in message
    assert f"size differs: {resized} is 32x16 px, its image 32x32" in message
    assert f"wrong format: {wrong} is PIL mode L" in message


def test_a_split_without_the_mask_column_fails(dense):
    task, data = dense
    path = manifest_path(data, "dense", "test")
    pd.read_csv(path, dtype=str).drop(columns=["mask"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"\[test\] expect_column_to_exist\(column='mask'\)"):
        validate_task("dense", task, data)
