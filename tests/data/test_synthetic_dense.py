"""The generated datasets of the dense and mixed multi-task cases: synthetic_dense (masks and depth maps in
NYU Depth V2's format, deterministic) and synthetic_b (synthetic's generator, a light background)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferbench.config import ConfigError, SyntheticSettings, build, Settings
from transferbench.data.registry import REQUIRED_COLUMNS, get_dataset
from transferbench.data.synthetic import generate as generate_synthetic
from transferbench.data.synthetic_dense import generate
from transferbench.errors import DataError


def _pixels(path):
    with Image.open(path) as image:
        return image.mode, image.size, np.asarray(image)


def test_synthetic_dense_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", images=8, image_size=32, seed=3)
    generate(tmp_path / "b", images=8, image_size=32, seed=3)
    assert (tmp_path / "a/metadata.csv").read_bytes() == (tmp_path / "b/metadata.csv").read_bytes()
    for column in ("filename", "mask", "depth"):
        for name in a[column]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = generate(tmp_path / "c", images=8, image_size=32, seed=4)
    assert (tmp_path / "a" / a["mask"][0]).read_bytes() != (tmp_path / "c" / other["mask"][0]).read_bytes()


def test_synthetic_dense_masks_and_depths_follow_the_dense_format(tmp_path):
    classes = ("circle", "square", "triangle")
    table = generate(tmp_path, images=24, classes=classes, image_size=48)
    seen = set()
    for row in table.itertuples():
        rgb_mode, size, rgb = _pixels(tmp_path / row.filename)
        mask_mode, mask_size, mask = _pixels(tmp_path / row.mask)
        depth_mode, depth_size, depth = _pixels(tmp_path / row.depth)
        assert (rgb_mode, mask_mode, depth_mode) == ("RGB", "L", "I;16") and size == mask_size == depth_size
        assert mask.max() <= len(classes) + 1 and (mask == 1).any() and (mask == 0).any()  # background, outlines
        assert (depth == 0).any() and 0 < (depth == 0).mean() < 0.05  # a small hole without a reading
        valid = depth > 0
        background, shapes = valid & (mask == 1), valid & (mask >= 2)
        assert 3000 <= depth[background].min() and depth[background].max() <= 6000
        if shapes.any():
            assert 800 <= depth[shapes].min() and depth[shapes].max() <= 2500
            brightness = rgb.max(axis=2).astype(float)  # nearer is brighter: shapes outshine the background
            assert brightness[shapes].mean() > brightness[background].mean() + 40
        seen |= set(np.unique(mask).tolist())
    assert seen == {0, 1, 2, 3, 4}


def test_synthetic_dense_manifest_has_the_dense_columns(tmp_path):
    generate(tmp_path, images=4, image_size=32)
    frame = get_dataset("synthetic_dense").manifest(tmp_path)
    assert set(REQUIRED_COLUMNS) | {"mask", "depth"} <= set(frame.columns)
    assert (frame["label"] == "scene").all() and frame["group"].is_unique
    assert all(p.startswith(tmp_path.as_posix()) for c in ("filename", "mask", "depth") for p in frame[c])
    with pytest.raises(DataError, match="generated, not fetched.*transferbench generate synthetic_dense"):
        get_dataset("synthetic_dense").fetch(tmp_path / "x", mirror=None)


def test_synthetic_dense_settings_refuse_unknown_shapes():
    with pytest.raises(ConfigError, match=r"data\.synthetic_dense\.classes"):
        build(Settings, {"study": {"name": "s", "tasks": ["t"], "backbones": ["b"]},
                         "data": {"synthetic_dense": {"classes": ["circle", "hexagon"]}}})
    with pytest.raises(DataError, match="classes must be shapes"):
        generate(Path("unused"), classes=("hexagon",))


def test_synthetic_b_is_synthetic_on_a_light_background(tmp_path):
    dark = SyntheticSettings(classes=("diamond", "cross"), groups=3, images_per_group=1, image_size=32)
    light = dark.model_copy(update={"background": "light"})
    generate_synthetic(dark, tmp_path / "dark")
    table = generate_synthetic(light, tmp_path / "light")
    assert set(table["label"]) == {"diamond", "cross"}
    for name in table["filename"]:
        d, b = (_pixels(tmp_path / which / name)[2].astype(int) for which in ("dark", "light"))
        shape = (d == b).all(axis=2)  # the same draw: the shape identical, the noise mirrored
        assert 0.05 < shape.mean() < 0.6
        assert (b[~shape] == 255 - d[~shape]).all() and b[~shape].mean() > 165 > 90 > d[~shape].max()
    assert get_dataset("synthetic_b").manifest(tmp_path / "light")["label"].tolist() == table["label"].tolist()
    with pytest.raises(DataError, match="transferbench generate synthetic_b"):
        get_dataset("synthetic_b").fetch(tmp_path / "x", mirror=None)


def test_classes_named_like_shapes_draw_those_shapes(tmp_path):
    """synthetic_b's diamond and cross are drawn as such (synthetic's own names already were)."""
    settings = SyntheticSettings(classes=("diamond", "cross"), groups=4, images_per_group=1, image_size=64)
    table = generate_synthetic(settings, tmp_path)
    for name, label in zip(table["filename"], table["label"]):
        rgb = _pixels(tmp_path / name)[2].astype(int)
        shape = rgb.max(axis=2) >= 140  # the shape is bright, the dark noise below 90
        rows, cols = np.nonzero(shape)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = shape.sum() / box  # a diamond or a cross fills about half its bounding box, a square all of it
        assert 0.3 < fill < 0.75, (label, fill)
