"""Adapter for Oxford Flowers-102 (PROTOCOL.md: random 80% train, rest halved into val/test).

Upstream files (official URLs, MD5s as pinned by torchvision): ``102flowers.tgz`` (``jpg/``),
``imagelabels.mat`` (1-based class per image) and ``setid.mat`` (the official
trnid/valid/tstid lists, kept as ``official_split`` metadata). Each image is its own group.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import scipy.io

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FILES = (
    RemoteFile(URL + "102flowers.tgz", "102flowers.tgz", "md5:52808999861908f626f3c1f4e79d11fa"),
    RemoteFile(URL + "imagelabels.mat", "imagelabels.mat", "md5:e0620be6f572b9609742df49c70aed4d"),
    RemoteFile(URL + "setid.mat", "setid.mat", "md5:a5357ecc9cb78c4bef273ce3793fc85c"),
)
SETS = {"trnid": "train", "valid": "val", "tstid": "test"}


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


@register_dataset("flowers102")
class Flowers102:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not ((dest / "jpg").is_dir() and (dest / "imagelabels.mat").is_file() and (dest / "setid.mat").is_file()):
            fetch_files(self.name, dest, FILES, mirror=mirror)

    def manifest(self, root: Path) -> pd.DataFrame:
        labels = _loadmat(root / "imagelabels.mat").get("labels")
        if labels is None:
            raise DataError(f"{root / 'imagelabels.mat'}: no 'labels' variable")
        setid = _loadmat(root / "setid.mat")
        official = {}
        for key, split in SETS.items():
            if key not in setid:
                raise DataError(f"{root / 'setid.mat'}: no '{key}' variable")
            official.update({int(i): split for i in setid[key].ravel()})
        ids = range(1, labels.size + 1)
        names = [(root / "jpg" / f"image_{i:05d}.jpg").as_posix() for i in ids]
        return pd.DataFrame({"filename": names, "label": [f"class_{int(c):03d}" for c in labels.ravel()],
                             "group": names, "source_row": list(ids),
                             "official_split": [official.get(i, "") for i in ids]})
