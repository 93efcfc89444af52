"""Adapter for MIT Indoor-67 (PROTOCOL.md: official test list; 10% of the train list -> val).

Upstream: ``indoorCVPR_09.tar`` (``Images/<class>/<file>``) and the official
``TrainImages.txt`` / ``TestImages.txt`` (lines ``<class>/<file>``). The upstream site
publishes no checksums, so these three are fetched unpinned (``checksum=None``): pin them
here once a team has verified copies. Images in neither list get an empty ``official_split``
and are quarantined by the ``official`` rule.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

FILES = (
    RemoteFile("http://groups.csail.mit.edu/vision/LabelMe/NewImages/indoorCVPR_09.tar", "indoorCVPR_09.tar", None),
    RemoteFile("http://web.mit.edu/torralba/www/TrainImages.txt", "TrainImages.txt", None),
    RemoteFile("http://web.mit.edu/torralba/www/TestImages.txt", "TestImages.txt", None),
)


def _list(path: Path) -> set[str]:
    if not path.is_file():
        raise DataError(f"Indoor67 split list not found: {path}")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


@register_dataset("indoor67")
class Indoor67:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not ((dest / "Images").is_dir() and (dest / "TestImages.txt").is_file()):
            fetch_files(self.name, dest, FILES, mirror=mirror)

    def manifest(self, root: Path) -> pd.DataFrame:
        train, test = _list(root / "TrainImages.txt"), _list(root / "TestImages.txt")
        both = train & test
        if both:
            raise DataError(f"{root}: {len(both)} images are in both TrainImages.txt and TestImages.txt, "
                            f"e.g. {sorted(both)[0]}")
        images = root / "Images"
        if not images.is_dir():
            raise DataError(f"Indoor67 images not found: {images}")
        rel = sorted(p.relative_to(images).as_posix() for p in images.glob("*/*") if p.is_file())
        return pd.DataFrame({
            "filename": [(images / r).as_posix() for r in rel], "label": [r.split("/")[0] for r in rel],
            "group": [(images / r).as_posix() for r in rel], "source_row": range(1, len(rel) + 1),
            "official_split": ["train" if r in train else "test" if r in test else "" for r in rel]})
