"""Adapter for the COVID-19 image data collection (ieee8023/covid-chestxray-dataset).

PROTOCOL.md, "Tasks and splits" (COVID-19). The raw data is the upstream repository at a
pinned commit, from ``$TRANSFERBENCH_DATA_MIRROR/covid-chestxray`` (a downscaled copy with a
SHA256SUMS file, see its DATASET.md) or, without a mirror, from the upstream archive. GitHub
archives are not byte-stable, so for the upstream path the pinned check is on the extracted
``metadata.csv``, which the mirror holds byte for byte.

Manifest: one row per metadata.csv record; ``group`` is the patient id, ``label`` the
``finding`` (NA and ``exclude=no_label`` for ``todo``), ``filename`` ``<root>/<folder>/<filename>``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd

from transferbench import atomic
from transferbench.data.fetch import RemoteFile, extract, file_digest, obtain
from transferbench.data.registry import register_dataset
from transferbench.data.tables import read_csv_strict
from transferbench.errors import DataError
from transferbench.progress import progress

COMMIT = "584034aa7fbf06496741f11008d72fd791c8e443"
ARCHIVE = RemoteFile(f"https://github.com/ieee8023/covid-chestxray-dataset/archive/{COMMIT}.zip",
                     f"covid-chestxray-dataset-{COMMIT}.zip", None)
METADATA_SHA256 = "e46ffab4cdeb4866491d32afe466baefd7acbcf268a75c260f81d8520b8664a0"
SUMS = "SHA256SUMS"
EXTRA_FILES = ("DATASET.md", "MISSING_IMAGES.txt")
UNLABELLED_FINDINGS = {"todo", ""}
METADATA_COLUMNS = ("patientid", "offset", "finding", "view", "modality", "location", "folder", "filename")


def _read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise DataError(f"{path} line {number}: expected '<sha256>  <path>', got {line!r}")
        sums[name.strip()] = digest
    return sums


def _verified(root: Path) -> bool:
    sums_file = root / SUMS
    if not sums_file.is_file():
        return False
    sums = _read_sums(sums_file)
    return sums.get("metadata.csv") == METADATA_SHA256 and all(
        (root / name).is_file() and file_digest(root / name) == digest
        for name, digest in progress(sums.items(), desc=f"checksums {root.name}", total=len(sums), unit="file"))


@register_dataset("covid-chestxray")
class CovidChestXray:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if _verified(dest):
            return
        source = mirror / self.name if mirror is not None else None
        if source is not None and (source / SUMS).is_file():
            self._copy_mirror(source, dest)
        else:
            self._download(dest, mirror)
        if not _verified(dest):
            raise DataError(f"{dest}: files do not match {dest / SUMS} after fetching")

    def _copy_mirror(self, source: Path, dest: Path) -> None:
        sums = _read_sums(source / SUMS)
        if sums.get("metadata.csv") != METADATA_SHA256:
            raise DataError(f"{source / SUMS}: metadata.csv is not the pinned upstream version "
                            f"(commit {COMMIT}, sha256 {METADATA_SHA256})")
        for name, digest in progress(sums.items(), desc=f"copy + checksum {source}", total=len(sums), unit="file"):
            target = dest / name
            if target.is_file() and file_digest(target) == digest:
                continue
            if not (source / name).is_file():
                raise DataError(f"mirror {source} lacks {name}, which its {SUMS} lists")
            if file_digest(source / name) != digest:
                raise DataError(f"mirror file {source / name} does not match its checksum in {source / SUMS}")
            atomic.copy_file(source / name, target)
        for name in EXTRA_FILES:
            if (source / name).is_file():
                atomic.copy_file(source / name, dest / name)
        atomic.copy_file(source / SUMS, dest / SUMS)

    def _download(self, dest: Path, mirror: Path | None) -> None:
        with tempfile.TemporaryDirectory(prefix="covid-fetch-") as tmp:
            archive = obtain(ARCHIVE, Path(tmp), dataset=self.name, mirror=mirror)
            extract(archive, Path(tmp) / "x")
            top = Path(tmp) / "x" / f"covid-chestxray-dataset-{COMMIT}"
            if file_digest(top / "metadata.csv") != METADATA_SHA256:
                raise DataError(f"{ARCHIVE.url}: metadata.csv does not match the pinned sha256 {METADATA_SHA256}")
            dest.mkdir(parents=True, exist_ok=True)
            lines = []
            for path in sorted([top / "metadata.csv", *(top / "images").iterdir()]):
                name = path.relative_to(top).as_posix()
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest / name)
                lines.append(f"{file_digest(path)}  {name}")
            atomic.write_text(dest / SUMS, "\n".join(lines) + "\n")

    def manifest(self, root: Path) -> pd.DataFrame:
        meta = read_csv_strict(root / "metadata.csv", required=METADATA_COLUMNS, what="COVID-19 metadata")
        frame = meta.rename(columns={"filename": "image_file"})
        frame.insert(0, "filename", [(root / folder / name).as_posix()
                                     for folder, name in zip(meta["folder"], meta["filename"])])
        unlabelled = meta["finding"].str.strip().str.casefold().isin(UNLABELLED_FINDINGS)
        frame.insert(1, "label", meta["finding"].str.strip().where(~unlabelled, pd.NA))
        frame.insert(2, "group", "patient-" + meta["patientid"].str.strip())
        frame.insert(3, "source_row", range(1, len(meta) + 1))
        frame["exclude"] = pd.Series(pd.NA, index=frame.index, dtype="object").where(~unlabelled, "no_label")
        frame["exclude_detail"] = ("finding " + meta["finding"].map(repr)).where(unlabelled, "")
        return frame
