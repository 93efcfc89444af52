"""Adapter for the FG-NET aging database (PROTOCOL.md: split by individual, 5 people test, 3 val).

Upstream: ``FGNET.zip`` (1,002 face images of 82 people, ages 0-69), extracted to
``FGNET/images/``. A file name carries the subject and the age: ``001A02.JPG`` is subject 001 at
age 2, and a trailing letter (``001A02a.JPG``) marks another image at the same age. Each subject is
one group, so no person appears in two splits.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

# The copy most age-estimation code downloads (Yanwei Fu's mirror; the original FG-NET site is gone).
# Not pinned: its checksum could not be verified offline. Pin it (sha256) on the first fetch.
FILES = (RemoteFile("https://yanweifu.github.io/FG_NET_data/FGNET.zip", "FGNET.zip", None),)
NAME = re.compile(r"^(\d{3})A(\d{2})([a-zA-Z]?)\.jpe?g$", re.IGNORECASE)


def _images(root: Path) -> list[Path]:
    """Every JPEG under ``root``, by path; archive debris (``__MACOSX/``, dot files) skipped."""
    found = [p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()
             and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@register_dataset("fgnet")
class Fgnet:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not (dest / "FGNET" / "images").is_dir():
            fetch_files(self.name, dest, FILES, mirror=mirror)

    def manifest(self, root: Path) -> pd.DataFrame:
        images = _images(root)
        if not images:
            raise DataError(f"FG-NET: no JPEG images under {root} (expected FGNET/images/NNNAaa.JPG)")
        rows = []
        for number, path in enumerate(images, 1):
            match = NAME.match(path.name)
            if match is None:
                raise DataError(f"FG-NET: {path}: file name is not <subject>A<age>[letter].JPG "
                                f"(e.g. 001A02.JPG, 001A02a.JPG)")
            subject, age, suffix = match.groups()
            rows.append({"filename": path.as_posix(), "label": str(int(age)), "group": subject,
                         "source_row": number, "age": int(age), "subject": subject, "suffix": suffix.lower()})
        return pd.DataFrame(rows)
