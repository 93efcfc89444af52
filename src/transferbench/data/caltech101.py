"""Adapter for Caltech-101 (PROTOCOL.md: same strategy as Flower102, random 80/10/10).

Upstream: ``caltech-101.zip`` from CaltechDATA (URL and MD5 as pinned by torchvision), which
holds ``101_ObjectCategories.tar.gz`` (``101_ObjectCategories/<class>/image_XXXX.jpg``). The
``BACKGROUND_Google`` folder is not a class and is left out. No official split exists.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

FILES = (RemoteFile("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", "caltech-101.zip",
                    "md5:3138e1922a9193bfa496528edbbc45d0"),)
NOT_A_CLASS = "BACKGROUND_Google"


@register_dataset("caltech101")
class Caltech101:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not (dest / "101_ObjectCategories").is_dir():
            fetch_files(self.name, dest, FILES, mirror=mirror, nested=("101_ObjectCategories.tar.gz",))

    def manifest(self, root: Path) -> pd.DataFrame:
        base = root / "101_ObjectCategories"
        if not base.is_dir():
            raise DataError(f"Caltech-101 images not found: {base}")
        rel = sorted(p.relative_to(base).as_posix() for p in base.glob("*/*")
                     if p.is_file() and p.parent.name != NOT_A_CLASS)
        names = [(base / r).as_posix() for r in rel]
        return pd.DataFrame({"filename": names, "label": [r.split("/")[0] for r in rel], "group": names,
                             "source_row": range(1, len(rel) + 1)})
