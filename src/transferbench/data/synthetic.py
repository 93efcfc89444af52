"""A deterministic generated dataset for unit tests and the CI smoke study.

Each image is a filled shape (one class per shape: the shape the class names, else the class's
position in ``SHAPES``) on a noisy background, dark or (``background: light``) bright, in a random
bright colour or, with ``class_hue``, in its class's own hue (an easy cue, so that tiny random-init
models learn the task within the smoke study's budget); each group (a
synthetic "individual", like a patient) has one class and one free-text location in the
COVID-19 metadata style, so the same geographic split and group checks run on it offline.
The same ``data.synthetic`` params always give byte-identical files.

``synthetic_b`` is a second domain from the same code and its own settings section (other shapes on
a light background): the second dataset of the mixed multi-task case, whose router tells the two apart.
"""

from __future__ import annotations

import colorsys

import numpy as np
import pandas as pd
from pathlib import Path
from PIL import Image, ImageDraw

from transferbench.config import SyntheticSettings
from transferbench import atomic
from transferbench.data.registry import register_dataset
from transferbench.data.tables import read_csv_strict
from transferbench.errors import DataError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")


def _draw(shape: str, size: int, rng: np.random.Generator, hue: float | None = None,
          light: bool = False) -> Image.Image:
    background = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    if light:  # the same draw, mirrored into the bright range (a dark background stays byte-identical)
        background = 255 - background
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    radius = int(size * rng.uniform(0.2, 0.35))
    cx, cy = (int(rng.integers(radius, size - radius)) for _ in range(2))
    colour = tuple(int(c) for c in rng.integers(140, 256, size=3))
    if hue is not None:  # the class's hue, jittered: the class shows in colour as well as shape
        jittered = (hue + rng.uniform(-0.04, 0.04)) % 1.0
        colour = tuple(int(255 * c)
                       for c in colorsys.hsv_to_rgb(jittered, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)))
    draw_shape(draw, shape, cx, cy, radius, colour)
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, radius: int, fill: tuple | int) -> None:
    """Fill one of ``SHAPES`` centred on (cx, cy) within ``radius`` (any other name draws a cross)."""
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    else:
        w = max(2, radius // 3)
        draw.rectangle((cx - w, cy - radius, cx + w, cy + radius), fill=fill)
        draw.rectangle((cx - radius, cy - w, cx + radius, cy + w), fill=fill)


def generate(settings: SyntheticSettings, dest: Path) -> pd.DataFrame:
    """Write ``images/*.png`` and ``metadata.csv`` under ``dest`` (replaced as a whole)."""
    rows = []
    shapes = [c if c in SHAPES else SHAPES[i % len(SHAPES)] for i, c in enumerate(settings.classes)]
    with atomic.atomic_directory(dest) as tmp:
        (tmp / "images").mkdir()
        n_locations = len(settings.locations)
        for group in range(settings.groups):
            # Classes and locations both cycle, shifted each round, so every location sees
            # every class and even a few groups cover every class.
            class_index = (group + group // n_locations) % len(settings.classes)
            location = settings.locations[group % n_locations]
            for offset in range(settings.images_per_group):
                rng = np.random.default_rng([settings.seed, group, offset])
                name = f"images/g{group:03d}_{offset}.png"
                hue = class_index / len(settings.classes) if settings.class_hue else None
                _draw(shapes[class_index], settings.image_size, rng, hue, settings.background == "light").save(
                    tmp / name, format="PNG")
                rows.append({"filename": name, "label": settings.classes[class_index],
                             "individual": f"ind{group:03d}", "offset": offset, "location": location})
        table = pd.DataFrame(rows)
        atomic.write_csv(tmp / "metadata.csv", table)
    return table


@register_dataset("synthetic")
class Synthetic:
    generated = True

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        raise DataError(f"the {self.name} dataset is generated, not fetched: run `transferbench generate "
                        f"{self.name}` (the generate_synthetic@{self.name} dvc stage) to create {dest}")

    def manifest(self, root: Path) -> pd.DataFrame:
        meta = read_csv_strict(root / "metadata.csv", required=("filename", "label", "individual", "location"),
                               what=f"{self.name} metadata")
        frame = meta.rename(columns={"filename": "image_file"}).drop(columns=["label"])
        frame.insert(0, "filename", [(root / name).as_posix() for name in meta["filename"]])
        frame.insert(1, "label", meta["label"].where(meta["label"] != "", pd.NA))
        frame.insert(2, "group", meta["individual"])
        frame.insert(3, "source_row", range(1, len(meta) + 1))
        return frame


@register_dataset("synthetic_b")
class SyntheticB(Synthetic):
    """The same generator and layout; generated from its own settings section (stage generate_synthetic)."""
