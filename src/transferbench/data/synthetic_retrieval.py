"""A deterministic generated retrieval dataset in the Oxford5k layout, for tests and the smoke study.

Each "landmark" is a scene of its own: a few coloured shapes in a fixed layout, drawn from the
landmark's own palette (hues spread around the colour wheel, an easy cue that even random-init
backbones pick up). The database holds several "viewpoints" of each landmark, pasted on a dark
noisy background at a random scale, shift and slight rotation, plus unrelated random scenes
(distractors). Views play the roles of the Oxford ground truth: queries (with a box around the
landmark) and ``good`` views show it whole, ``ok`` views show a heavily cropped part of it and
``junk`` views show it tiny. The files are written exactly as Oxford's (``images/<stem>.png``,
``gt_files/<landmark>_<n>_{query,good,ok,junk}.txt``), so ``oxford5k``'s parser reads them. The
same arguments always give byte-identical files.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from transferbench import atomic
from transferbench.data.oxford5k import Query, ground_truth, retrieval_manifest
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

# Roles of the views after the queries, in turn.
VIEW_CYCLE = ("good", "ok", "good", "junk")
# (min, max) size of the pasted landmark relative to the image side, per role.
SCALES = {"query": (0.8, 0.95), "good": (0.7, 1.0), "ok": (1.8, 2.4), "junk": (0.12, 0.2)}


def _scene(hue: float, size: int, rng: np.random.Generator) -> Image.Image:
    """A landmark (or distractor): background and shapes in shades of one hue."""

    def shade(saturation: tuple[float, float], value: tuple[float, float]) -> tuple[int, ...]:
        h = (hue + rng.uniform(-0.03, 0.03)) % 1.0
        return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)))

    image = Image.new("RGB", (size, size), shade((0.5, 0.8), (0.35, 0.5)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (rng.uniform(0.0, 0.7) * size for _ in range(2))
        w, h = (rng.uniform(0.2, 0.45) * size for _ in range(2))
        box = (x, y, min(size - 1, x + w), min(size - 1, y + h))
        colour = shade((0.6, 1.0), (0.7, 1.0))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=colour)
    return image


def _view(scene: Image.Image, role: str, size: int,
          rng: np.random.Generator) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """``scene`` pasted on a dark noisy background as ``role`` dictates; returns the image and the
    box of the visible landmark."""
    background = Image.fromarray(rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8), "RGB")
    side = max(2, int(round(size * rng.uniform(*SCALES[role]))))
    layer = scene.convert("RGBA").resize((side, side), Image.Resampling.BILINEAR)
    layer = layer.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, expand=True)
    if role == "ok":  # a part of the landmark fills the frame
        left, top = (int(rng.uniform(-(layer.width - size), 0)) for _ in range(2))
    elif role == "junk":  # tiny, anywhere
        left, top = (int(rng.uniform(0, size - layer.width)) for _ in range(2))
    else:  # whole, near the centre
        left, top = (int((size - layer.width) / 2 + rng.uniform(-0.1, 0.1) * size) for _ in range(2))
    background.paste(layer, (left, top), layer)
    pixels = np.asarray(background, dtype=np.int16) + rng.normal(0, 6, size=(size, size, 3)).round().astype(np.int16)
    box = (max(0, left), max(0, top), min(size, left + layer.width), min(size, top + layer.height))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), tuple(float(v) for v in box)


def generate(dest: Path, *, landmarks: int = 5, views_per_landmark: int = 8, queries_per_landmark: int = 2,
             distractors: int = 20, image_size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Write the dataset under ``dest`` (replaced as a whole) and return its manifest (one row per image)."""
    if not 0 < queries_per_landmark < views_per_landmark:
        raise DataError(f"synthetic_retrieval: need 0 < queries_per_landmark ({queries_per_landmark}) "
                        f"< views_per_landmark ({views_per_landmark})")
    if landmarks < 1 or distractors < 0 or image_size < 16:
        raise DataError(f"synthetic_retrieval: need landmarks >= 1, distractors >= 0 and image_size >= 16 "
                        f"(got {landmarks}, {distractors}, {image_size})")
    with atomic.atomic_directory(dest) as tmp:
        (tmp / "images").mkdir()
        (tmp / "gt_files").mkdir()
        for i in range(landmarks):
            name = f"landmark{i:02d}"
            hue = (i + np.random.default_rng([seed, 0, i]).uniform(-0.15, 0.15)) / landmarks % 1.0
            scene = _scene(hue, image_size, np.random.default_rng([seed, 1, i]))
            roles = {"query": [], "good": [], "ok": [], "junk": []}
            boxes = {}
            for v in range(views_per_landmark):
                role = "query" if v < queries_per_landmark else VIEW_CYCLE[(v - queries_per_landmark) % len(VIEW_CYCLE)]
                stem = f"{name}_{v:03d}"
                image, boxes[stem] = _view(scene, role, image_size, np.random.default_rng([seed, 2, i, v]))
                image.save(tmp / "images" / f"{stem}.png", format="PNG")
                roles[role].append(stem)
            good = roles["query"] + roles["good"]  # as in Oxford, the query image is one of its good images
            for n, stem in enumerate(roles["query"], 1):
                x1, y1, x2, y2 = boxes[stem]
                (tmp / "gt_files" / f"{name}_{n}_query.txt").write_text(
                    f"oxc1_{stem} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}\n", encoding="utf-8")
                for kind, stems in (("good", good), ("ok", roles["ok"]), ("junk", roles["junk"])):
                    (tmp / "gt_files" / f"{name}_{n}_{kind}.txt").write_text(
                        "".join(f"{s}\n" for s in stems), encoding="utf-8")
        for k in range(distractors):
            rng = np.random.default_rng([seed, 3, k])
            scene = _scene(float(rng.uniform()), image_size, rng)
            image, _ = _view(scene, "good", image_size, rng)
            image.save(tmp / "images" / f"distractor_{k:04d}.png", format="PNG")
    return retrieval_manifest(dest)


@register_dataset("synthetic_retrieval")
class SyntheticRetrieval:
    generated = True

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        raise DataError("the synthetic_retrieval dataset is generated, not fetched: run `transferbench generate "
                        "synthetic_retrieval` (the generate_synthetic@synthetic_retrieval dvc stage) "
                        f"to create {dest}")

    def manifest(self, root: Path) -> pd.DataFrame:
        return retrieval_manifest(root)

    def ground_truth(self, root: Path) -> list[Query]:
        return ground_truth(root)
