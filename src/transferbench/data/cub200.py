"""Adapter for CUB-200-2011 (PROTOCOL.md: official test; 10% of official train -> val).

Upstream: ``CUB_200_2011.tgz`` from CaltechDATA (MD5 as published with the dataset's common
loaders). Parsed files: ``images.txt`` (id path), ``image_class_labels.txt`` (id class),
``classes.txt`` (class name), ``train_test_split.txt`` (id 1=train/0=test).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

FILES = (RemoteFile("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", "CUB_200_2011.tgz",
                    "md5:97eceeb196236b17998738112f37df78"),)


def _pairs(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DataError(f"CUB-200-2011 file not found: {path}")
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DataError(f"{path} line {number}: expected '<id> <value>', got {line!r}")
        out[int(key)] = value.strip()
    return out


@register_dataset("cub200")
class Cub200:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not (dest / "CUB_200_2011" / "images.txt").is_file():
            fetch_files(self.name, dest, FILES, mirror=mirror)

    def manifest(self, root: Path) -> pd.DataFrame:
        base = root / "CUB_200_2011"
        images, labels = _pairs(base / "images.txt"), _pairs(base / "image_class_labels.txt")
        classes, is_train = _pairs(base / "classes.txt"), _pairs(base / "train_test_split.txt")
        rows = []
        for image_id, path in sorted(images.items()):
            if image_id not in labels or image_id not in is_train:
                raise DataError(f"{base}: image id {image_id} ({path}) has no class or no train/test entry")
            class_name = classes.get(int(labels[image_id]))
            if class_name is None:
                raise DataError(f"{base / 'image_class_labels.txt'}: image id {image_id} has unknown class "
                                f"{labels[image_id]}")
            filename = (base / "images" / path).as_posix()
            rows.append({"filename": filename, "label": class_name, "group": filename, "source_row": image_id,
                         "official_split": "train" if is_train[image_id] == "1" else "test"})
        return pd.DataFrame(rows)
