"""A deterministic generated dense dataset, NYU Depth V2's layout in miniature, for tests and the smoke study.

Each image is a scene: a background (mask class 1) on a smooth depth ramp 3-6 m from the camera, in
front of which 1-3 filled shapes stand, each of a class of ``classes`` (mask class 2.. len(classes)+1,
so a task on it has ``dense.num_classes = len(classes) + 1``) at its own constant depth 0.8-2.5 m, the
nearer painted over the farther. Like NYU's, the mask has a void (0) band: the 1-pixel outline of each
shape; the depth map has a small hole without a reading (0). So that tiny random-init models learn both
tasks within a smoke budget, each class is drawn in its own hue, and brightness falls with depth: a
shape is brighter the nearer it is, the grey background darker the farther.

Layout (as ``nyu_depth_v2``'s): ``images/NNN.png`` (RGB), ``masks/NNN.png`` (8-bit),
``depths/NNN.png`` (16-bit millimetres) and ``metadata.csv`` (``filename, mask, depth, group,
shapes``); each image is its own group, its label "scene". The same arguments always give
byte-identical files.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from transferbench import atomic
from transferbench.data.registry import register_dataset
from transferbench.data.synthetic import SHAPES, draw_shape
from transferbench.data.tables import read_csv_strict
from transferbench.errors import DataError

BACKGROUND_DEPTH = (3.0, 6.0)  # metres: the near and far ends of the background's range
SHAPE_DEPTH = (0.8, 2.5)
LABEL = "scene"  # a dense image has no class of its own; the split stratifies on one label


def _outline(mask: np.ndarray) -> np.ndarray:
    """Shape pixels (class >= 2) next to a pixel of another class (4-neighbourhood)."""
    edge = np.zeros(mask.shape, dtype=bool)
    vertical, horizontal = mask[1:, :] != mask[:-1, :], mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge & (mask >= 2)


def _scene(classes: tuple[str, ...], size: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(RGB uint8, mask uint8, depth uint16 mm) of one image."""
    rows, cols = np.mgrid[0:size, 0:size] / (size - 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = cols * np.cos(angle) + rows * np.sin(angle)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    near, far = rng.uniform(BACKGROUND_DEPTH[0], 4.0), rng.uniform(5.0, BACKGROUND_DEPTH[1])
    depth = near + (far - near) * ramp
    span = BACKGROUND_DEPTH[1] - BACKGROUND_DEPTH[0]
    grey = 120 - 60 * (depth - BACKGROUND_DEPTH[0]) / span  # 120 at 3 m, 60 at 6 m
    pixels = np.repeat(grey[..., None], 3, axis=2)
    mask = np.ones((size, size), dtype=np.uint8)

    count = int(rng.integers(1, 4))
    kinds = rng.integers(len(classes), size=count)
    distances = rng.uniform(*SHAPE_DEPTH, size=count)
    for i in np.argsort(-distances, kind="stable"):  # far to near: a nearer shape hides a farther one
        kind, distance = int(kinds[i]), float(distances[i])
        radius = max(2, int(size * rng.uniform(0.12, 0.22)))
        cx, cy = (int(rng.integers(radius, size - radius)) for _ in range(2))
        canvas = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(canvas), classes[kind], cx, cy, radius, 1)
        region = np.asarray(canvas, dtype=bool)
        hue = (kind / len(classes) + rng.uniform(-0.03, 0.03)) % 1.0
        value = 1.0 - 0.35 * (distance - SHAPE_DEPTH[0]) / (SHAPE_DEPTH[1] - SHAPE_DEPTH[0])  # nearer: brighter
        pixels[region] = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), value))
        mask[region] = kind + 2
        depth[region] = distance
    mask[_outline(mask)] = 0

    millimetres = np.rint(depth * 1000).astype(np.uint16)
    hole = max(2, size // 12)
    top, left = (int(rng.integers(0, size - hole)) for _ in range(2))
    millimetres[top:top + hole, left:left + hole] = 0  # no reading, as where a Kinect sees none
    pixels += rng.integers(-6, 7, size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mask, millimetres


def generate(dest: Path, *, images: int = 96, classes: tuple[str, ...] = ("circle", "square", "triangle"),
             image_size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Write ``images/``, ``masks/``, ``depths/`` and ``metadata.csv`` under ``dest`` (replaced as a whole)."""
    unknown = [c for c in classes if c not in SHAPES]
    if not classes or unknown:
        raise DataError(f"synthetic_dense: classes must be shapes of {SHAPES}, got {list(classes)}")
    rows = []
    with atomic.atomic_directory(dest) as tmp:
        for folder in ("images", "masks", "depths"):
            (tmp / folder).mkdir()
        for index in range(images):
            rgb, mask, depth = _scene(tuple(classes), image_size, np.random.default_rng([seed, index]))
            row = {"filename": f"images/{index:03d}.png", "mask": f"masks/{index:03d}.png",
                   "depth": f"depths/{index:03d}.png", "group": f"img{index:03d}",
                   "shapes": " ".join(classes[k - 2] for k in np.unique(mask) if k >= 2)}
            Image.fromarray(rgb, "RGB").save(tmp / row["filename"], format="PNG")
            Image.fromarray(mask).save(tmp / row["mask"], format="PNG")
            Image.fromarray(depth).save(tmp / row["depth"], format="PNG")
            rows.append(row)
        table = pd.DataFrame(rows, columns=["filename", "mask", "depth", "group", "shapes"])
        atomic.write_csv(tmp / "metadata.csv", table)
    return table


@register_dataset("synthetic_dense")
class SyntheticDense:
    generated = True

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        raise DataError(f"the synthetic_dense dataset is generated, not fetched: run `transferbench generate "
                        f"synthetic_dense` (the generate_synthetic@synthetic_dense dvc stage) to create {dest}")

    def manifest(self, root: Path) -> pd.DataFrame:
        meta = read_csv_strict(root / "metadata.csv", required=("filename", "mask", "depth", "group"),
                               what="synthetic_dense metadata")
        return pd.DataFrame({"filename": [(root / name).as_posix() for name in meta["filename"]],
                             "label": LABEL, "group": meta["group"], "source_row": range(1, len(meta) + 1),
                             "mask": [(root / name).as_posix() for name in meta["mask"]],
                             "depth": [(root / name).as_posix() for name in meta["depth"]]})
