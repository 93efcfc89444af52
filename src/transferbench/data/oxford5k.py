"""Adapter for the Oxford Buildings dataset, Oxford5k (PROTOCOL.md, "Unsupervised retrieval: Oxford5k").

Upstream (official VGG URLs): the 5,062 database JPEGs (``oxbuild_images-v1.tgz``, extracted
under ``images/``) and the ground truth ``gt_files_170407.tgz`` (extracted under ``gt_files/``).
For each of the 55 queries ``<landmark>_<n>``, ``<landmark>_<n>_query.txt`` holds one line
``oxc1_<image stem> x1 y1 x2 y2`` and ``<landmark>_<n>_{good,ok,junk}.txt`` one image stem per line.
No split: there is no training; every image is in the database and each is its own group.
``ground_truth`` turns the lists into ``Query`` records (``evaluation.retrieval`` scores them); the generated
``synthetic_retrieval`` dataset is written in this layout and read by the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transferbench.data.fetch import RemoteFile, fetch_files
from transferbench.data.registry import register_dataset
from transferbench.errors import DataError

URL = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/"
# No MD5 of either archive is published by VGG or pinned by any code we could consult offline,
# so the checksums are left unpinned. The images moved from oxbuild_images.tgz to
# oxbuild_images-v1.tgz on the VGG site (the same 5,062 files).
IMAGES = RemoteFile(URL + "oxbuild_images-v1.tgz", "oxbuild_images-v1.tgz", None)
GROUND_TRUTH = RemoteFile(URL + "gt_files_170407.tgz", "gt_files_170407.tgz", None)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LISTS = ("good", "ok", "junk")
QUERY_PREFIX = "oxc1_"
_GT_FILE = re.compile(r"^(?P<query>(?P<landmark>.+)_\d+)_(?P<kind>query|good|ok|junk)\.txt$")


@dataclass(frozen=True)
class Query:
    """One ground-truth query: the database image it comes from, its box and its relevance lists."""

    name: str  # e.g. "all_souls_1"
    image: str  # the query image's file stem in the database
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in the image's pixels
    good: frozenset[str]
    ok: frozenset[str]
    junk: frozenset[str]

    @property
    def positives(self) -> frozenset[str]:
        return self.good | self.ok


def database_images(root: Path) -> dict[str, Path]:
    """Image stem -> file, for every image under ``root/images`` (sorted by stem)."""
    base = root / "images"
    if not base.is_dir():
        raise DataError(f"retrieval images not found: {base}")
    found: dict[str, Path] = {}
    for path in sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        if path.stem in found:
            raise DataError(f"{path}: image name {path.stem!r} also used by {found[path.stem]}")
        found[path.stem] = path
    if not found:
        raise DataError(f"no images under {base}")
    return dict(sorted(found.items()))


def _parse_query(path: Path, images: dict[str, Path]) -> tuple[str, tuple[float, float, float, float]]:
    lines = [(n, line.split()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    if len(lines) != 1:
        raise DataError(f"{path}: expected one line 'oxc1_<image> x1 y1 x2 y2', found {len(lines)} lines")
    number, fields = lines[0]
    try:
        if len(fields) != 5:
            raise ValueError(f"{len(fields)} fields")
        x1, y1, x2, y2 = (float(v) for v in fields[1:])
    except ValueError as exc:
        raise DataError(f"{path}:{number}: malformed query line {' '.join(fields)!r} "
                        f"(expected 'oxc1_<image> x1 y1 x2 y2': {exc})") from None
    if not (x2 > x1 and y2 > y1):
        raise DataError(f"{path}:{number}: empty query box {x1} {y1} {x2} {y2} (needs x2 > x1 and y2 > y1)")
    image = fields[0].removeprefix(QUERY_PREFIX)
    if image not in images:
        raise DataError(f"{path}:{number}: query image {image!r} is not in the database")
    return image, (x1, y1, x2, y2)


def _parse_list(path: Path, images: dict[str, Path]) -> frozenset[str]:
    stems = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stem = line.strip()
        if not stem:
            continue
        if stem not in images:
            raise DataError(f"{path}:{number}: image {stem!r} is not in the database")
        stems.add(stem)
    return frozenset(stems)


def ground_truth(root: Path) -> list[Query]:
    """Every query under ``root/gt_files``, sorted by name, checked against the database images."""
    gt = root / "gt_files"
    if not gt.is_dir():
        raise DataError(f"retrieval ground truth not found: {gt}")
    images = database_images(root)
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(gt.glob("*.txt")):
        match = _GT_FILE.match(path.name)
        if match is None:
            raise DataError(f"{path}: not a ground-truth file name (<landmark>_<n>_{{query,good,ok,junk}}.txt)")
        files.setdefault(match["query"], {})[match["kind"]] = path
    if not files:
        raise DataError(f"no ground-truth files (*_query.txt) in {gt}")
    queries = []
    for name, kinds in sorted(files.items()):
        missing = [f"{name}_{kind}.txt" for kind in ("query", *LISTS) if kind not in kinds]
        if missing:
            raise DataError(f"{gt}: query {name!r} lacks {', '.join(missing)}")
        image, bbox = _parse_query(kinds["query"], images)
        good, ok, junk = (_parse_list(kinds[kind], images) for kind in LISTS)
        if not good | ok:
            raise DataError(f"{kinds['good']}: query {name!r} has no good or ok image")
        queries.append(Query(name, image, bbox, good, ok, junk))
    return queries


def retrieval_manifest(root: Path) -> pd.DataFrame:
    """One row per database image; label = the landmark whose good/ok lists hold it, else 'background'."""
    images = database_images(root)
    queries = ground_truth(root)
    landmark = {}
    for q in queries:
        for stem in sorted(q.positives):
            landmark.setdefault(stem, _GT_FILE.match(f"{q.name}_query.txt")["landmark"])
    query_of = {}
    for q in queries:
        query_of.setdefault(q.image, q.name)
    stems = list(images)
    return pd.DataFrame({"filename": [images[s].as_posix() for s in stems],
                         "label": [landmark.get(s, "background") for s in stems],
                         "group": stems, "source_row": range(1, len(stems) + 1),
                         "image_id": stems, "query": [query_of.get(s, "") for s in stems]})


@register_dataset("oxford5k")
class Oxford5k:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if not (dest / "images").is_dir():
            fetch_files(self.name, dest / "images", (IMAGES,), mirror=mirror)
        if not (dest / "gt_files").is_dir():
            fetch_files(self.name, dest / "gt_files", (GROUND_TRUTH,), mirror=mirror)

    def manifest(self, root: Path) -> pd.DataFrame:
        return retrieval_manifest(root)

    def ground_truth(self, root: Path) -> list[Query]:
        return ground_truth(root)
