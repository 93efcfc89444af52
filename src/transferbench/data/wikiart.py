"""Adapter for WikiArt as released with ArtGAN (PROTOCOL.md: style classification, split as Flower102).

Upstream (github.com/cs-chan/ArtGAN, "WikiArt Dataset"): ``wikiart.zip`` holds the paintings as
``wikiart/<style>/<artist>_<title>.jpg`` (27 style folders, about 80k images) and
``wikiart_csv.zip`` holds ``wikiart_csv/style_{train,val}.csv``, rows ``<style>/<file>.jpg,<class
index>`` with no header. The label is the style folder; each painting is its own group; the
random 80/10/10 split is the generic split code's. ArtGAN's own style train/val lists, when
present, are kept as ``official_split`` metadata (the split rule does not use them).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

# The ArtGAN README links the images on Google Drive (no direct download URL); the authors'
# server below is the direct URL that the README gives for the csv files and that ArtGAN users
# fetch the images from. Neither archive has a published checksum, and none could be found to pin
# offline, so both stay unpinned.
URL = "http://web.fsktm.um.edu.my/~cschan/source/ICIP2017/"
FILES = (RemoteFile(URL + "wikiart.zip", "wikiart.zip", None),
         RemoteFile(URL + "wikiart_csv.zip", "wikiart_csv.zip", None))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OFFICIAL_LISTS = {"style_train.csv": "train", "style_val.csv": "val"}


def _official_split(root: Path) -> dict[str, str]:
    """``<style>/<file>`` -> "train"/"val" from ArtGAN's style lists (empty when they are absent)."""
    split: dict[str, str] = {}
    for name, which in OFFICIAL_LISTS.items():
        path = root / "wikiart_csv" / name
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if not row:
                    continue
                if len(row) != 2 or not row[1].strip().isdigit() or "/" not in row[0]:
                    raise DataError(f"{path}:{number}: malformed row {','.join(row)!r} "
                                    f"(expected '<style>/<file>.jpg,<class index>')")
                split[row[0].strip()] = which
    return split


@register_dataset("wikiart")
class WikiArt:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not ((dest / "wikiart").is_dir() and (dest / "wikiart_csv").is_dir()):
            fetch_files(self.name, dest, FILES, mirror=mirror)

    def manifest(self, root: Path) -> pd.DataFrame:
        base = root / "wikiart"
        if not base.is_dir():
            raise DataError(f"WikiArt images not found: {base}")
        rel = sorted(p.relative_to(base).as_posix() for p in base.glob("*/*")
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not rel:
            raise DataError(f"no images in the style folders under {base}")
        official = _official_split(root)
        names = [(base / r).as_posix() for r in rel]
        return pd.DataFrame({"filename": names, "label": [r.split("/")[0] for r in rel], "group": names,
                             "source_row": range(1, len(rel) + 1),
                             "official_split": [official.get(r, "") for r in rel]})
