"""A deterministic generated age dataset, FG-NET's shape in miniature, for tests and the smoke study.

Each synthetic "individual" (a group, like an FG-NET subject) is photographed at several distinct
integer ages in 0..``max_age``, on a noisy background tinted in the individual's own colour. The age
shows twice, so that tiny random-init models learn it within the smoke study's budget: a bright
horizontal bar, centred (a horizontal flip keeps it), whose length grows with age, and an overall
brightness that grows with age. The same arguments always give byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from transferbench import atomic
from transferbench.data.registry import register_dataset
from transferbench.data.tables import read_csv_strict
from transferbench.errors import DataError


def _draw(age: int, max_age: int, size: int, tint: np.ndarray, rng: np.random.Generator) -> Image.Image:
    level = age / max_age
    noise = rng.integers(0, 60, size=(size, size, 1)).astype(np.float64)
    pixels = noise * tint + 90 * level  # older: brighter overall
    thickness = max(2, size // 8)
    length = round((0.15 + 0.75 * level) * size)  # older: longer bar
    top = int(rng.integers(size // 4, 3 * size // 4 - thickness))
    left = (size - length) // 2
    pixels[top:top + thickness, left:left + length] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def generate(dest: Path, *, individuals: int = 24, images_per_individual: int = 6, max_age: int = 69,
             image_size: int = 64, seed: int = 0) -> pd.DataFrame:
    """Write ``images/*.png`` and ``metadata.csv`` under ``dest`` (replaced as a whole)."""
    if images_per_individual > max_age + 1:
        raise DataError(f"synthetic_age: {images_per_individual} images per individual need as many distinct "
                        f"ages, but 0..{max_age} has only {max_age + 1}")
    rows = []
    with atomic.atomic_directory(dest) as tmp:
        (tmp / "images").mkdir()
        for individual in range(individuals):
            rng = np.random.default_rng([seed, individual])
            tint = rng.uniform(0.4, 1.0, size=3)
            ages = np.sort(rng.choice(max_age + 1, size=images_per_individual, replace=False))
            for offset, age in enumerate(int(a) for a in ages):
                name = f"images/i{individual:03d}_a{age:02d}.png"
                _draw(age, max_age, image_size, tint, np.random.default_rng([seed, individual, offset])).save(
                    tmp / name, format="PNG")
                rows.append({"filename": name, "individual": f"ind{individual:03d}", "age": age})
        table = pd.DataFrame(rows)
        atomic.write_csv(tmp / "metadata.csv", table)
    return table


@register_dataset("synthetic_age")
class SyntheticAge:
    generated = True

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        raise DataError(f"the synthetic_age dataset is generated, not fetched: run "
                        f"`transferbench generate synthetic_age` (the generate_synthetic@synthetic_age dvc stage) "
                        f"to create {dest}")

    def manifest(self, root: Path) -> pd.DataFrame:
        meta = read_csv_strict(root / "metadata.csv", required=("filename", "individual", "age"),
                               what="synthetic_age metadata")
        bad = meta.index[~meta["age"].str.fullmatch(r"\d+")]
        if len(bad):
            raise DataError(f"{root / 'metadata.csv'} row {bad[0] + 2}: age {meta['age'][bad[0]]!r} is not an integer")
        return pd.DataFrame({"filename": [(root / name).as_posix() for name in meta["filename"]],
                             "label": [str(int(a)) for a in meta["age"]], "group": meta["individual"],
                             "source_row": range(1, len(meta) + 1), "age": meta["age"].astype(int),
                             "subject": meta["individual"]})
