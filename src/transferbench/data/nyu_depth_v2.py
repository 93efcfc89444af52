"""Adapter for NYU Depth V2's labelled set (PROTOCOL.md, "Dense tasks: NYU Depth V2"): segmentation and depth.

Upstream: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5; about 2.8 GB), read with h5py. MATLAB
stores arrays transposed, so h5py sees ``images`` as (N, 3, W, H) uint8, ``depths`` as (N, W, H)
float32 metres, ``labels`` as (N, W, H) uint16 (0 = unlabelled, 1..894 = the raw classes), and the cell
arrays ``sceneTypes`` (one per image) and ``names`` (one per raw class) as object references to
uint16 character arrays. ``fetch`` decodes the file once, one image at a time, into

- ``images/NNNN.png``: RGB, 480 high x 640 wide (NNNN = MATLAB's 1-based image index);
- ``labels40/NNNN.png``: 8-bit, 0 = unlabelled (ignored), 1..40 = the standard 40 classes (Gupta et
  al., CVPR 2013), mapped from the raw classes by ``CLASS_MAPPING_40``;
- ``depth/NNNN.png``: 16-bit, depth in millimetres, 0 = no reading (not finite or <= 0 in the file);
- ``metadata.csv``: ``index, filename, mask, depth, scene``,

and does not keep the .mat. ``manifest`` reads ``metadata.csv``: label = the image's scene type
(``sceneTypes``, e.g. "kitchen"), group = the image (the protocol's split is random over images), plus
the dense columns ``mask`` and ``depth`` (registry.py, DenseSettings).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from transferbench import atomic
from transferbench.data.fetch import RemoteFile, obtain, verify_checksum
from transferbench.data.registry import register_dataset
from transferbench.data.tables import read_csv_strict
from transferbench.errors import DataError

# The official download. Neither the NYU page nor any code we could consult offline publishes a
# checksum of the file, so it stays unpinned: pin it (sha256) on the first fetch.
LABELED = RemoteFile("http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat",
                     "nyu_depth_v2_labeled.mat", None)
METADATA = "metadata.csv"

CLASS_NAMES_40 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes",
    "ceiling", "books", "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
    "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture",
    "otherprop",
)

# Raw class i (1..894, the order of the file's ``names``) -> its 40-class label: ``mapClass`` of
# ``classMapping40.mat`` (Gupta, Arbelaez and Malik, CVPR 2013) as distributed in
# github.com/ankurhanda/nyuv2-meta-data (commit b92d15c; the file's sha256
# ff177194cce9a2163517f1e1e6f1c64c50987162f542dedddc04bbf6ebe6d851), copied verbatim. Its ``className``
# is CLASS_NAMES_40; each of the first 37 classes is the one raw class of the same name (wall = raw 21).
CLASS_MAPPING_40 = (
    40, 40, 3, 22, 5, 40, 12, 38, 40, 40, 2, 39, 40, 40, 26, 40, 24, 40, 7, 40, 1, 40, 40, 34, 38,
    29, 40, 8, 40, 40, 40, 40, 38, 40, 40, 14, 40, 38, 40, 40, 40, 15, 39, 40, 30, 40, 40, 39, 40, 39,
    38, 40, 38, 40, 37, 40, 38, 38, 9, 40, 40, 38, 40, 11, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 38, 13, 40, 40, 6, 40, 23, 40, 39, 10, 16, 40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 38, 40, 39, 40, 40, 40, 40, 39, 38, 40, 40, 40, 40, 40, 40, 18, 40, 40, 19, 28, 33, 40,
    40, 40, 40, 40, 40, 40, 40, 40, 38, 27, 36, 40, 40, 40, 40, 21, 40, 20, 35, 40, 40, 40, 40, 40, 40,
    40, 40, 38, 40, 40, 40, 4, 32, 40, 40, 39, 40, 39, 40, 40, 40, 40, 40, 17, 40, 40, 25, 40, 39, 40,
    40, 40, 40, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 38, 38, 40, 40, 39, 40, 39, 40, 38, 39, 38,
    40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 38, 40, 40, 38, 38, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 40, 40, 38, 40, 40, 39, 40, 40,
    38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 31, 40, 40, 40, 40, 40, 40, 40, 38, 40, 40, 38, 39, 39, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 38, 40, 39, 40, 40, 39, 40, 40, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 38, 39, 40, 40,
    40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 38, 39, 40, 40, 40, 40, 40, 40, 40,
    39, 40, 40, 40, 40, 40, 40, 38, 40, 40, 40, 38, 40, 39, 40, 40, 40, 39, 39, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 39, 40, 40, 39, 39, 40, 40,
    40, 40, 38, 40, 40, 38, 39, 39, 40, 39, 40, 39, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39,
    40, 38, 40, 39, 40, 40, 40, 40, 40, 39, 39, 40, 40, 40, 40, 40, 40, 39, 39, 40, 40, 38, 39, 39, 40,
    40, 40, 40, 40, 40, 40, 40, 40, 39, 39, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 39, 40, 40, 39, 40,
    40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 38, 40, 40, 40, 40, 40, 40, 40, 39, 38,
    39, 40, 38, 39, 40, 39, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 38, 40, 40,
    39, 40, 40, 40, 39, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 40, 40, 39, 38, 40, 40, 38, 40, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39,
    40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 38, 40, 40, 38, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 40, 38, 38, 38, 40, 40, 40, 38, 40, 40, 40, 38, 38, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 38,
    40, 38, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40,
    40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 39, 40, 40, 40,
    40, 38, 38, 40, 40, 40, 38, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 40, 39,
    40, 40, 39, 39, 40, 40, 40, 40, 40, 40, 40, 40, 39, 39, 39, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40,
    40, 40, 40, 39, 40, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 40, 38,
    40, 40, 40, 40, 40, 40, 40, 39, 40, 40, 38, 40, 39, 40, 40, 40, 40, 38, 40, 40, 40, 40, 40, 38, 40,
    40, 40, 40, 40, 40, 40, 39, 40, 40, 40, 40, 40, 40, 40, 40, 40, 39, 40, 40,
)


def _dataset(mat: h5py.File, key: str, path: Path) -> h5py.Dataset:
    node = mat.get(key)
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: no dataset {key!r}; is this NYU Depth V2's nyu_depth_v2_labeled.mat "
                        f"(MATLAB v7.3)? Delete it and fetch again")
    return node


def _check(node: h5py.Dataset, path: Path, shape: tuple[int | None, ...], kind: str, expected: str) -> None:
    """``node`` must have ``shape`` (None: any size) and a dtype of numpy kind ``kind`` ("u", "f", "O")."""
    fits = len(node.shape) == len(shape) and all(s is None or s == n for s, n in zip(shape, node.shape))
    if not fits or node.dtype.kind not in kind:
        raise DataError(f"{path}: dataset {node.name.lstrip('/')!r} is {node.shape} {node.dtype}, expected {expected}")


def _strings(mat: h5py.File, key: str, path: Path, count: int) -> list[str]:
    """A MATLAB cell array of strings: each cell a reference to a uint16 array of character codes."""
    node = _dataset(mat, key, path)
    _check(node, path, (None, None), "O", f"a cell array of {count} strings (object references)")
    refs = node[()].ravel()
    if len(refs) != count:
        raise DataError(f"{path}: dataset {key!r} holds {len(refs)} strings, expected {count}")
    texts = []
    for number, ref in enumerate(refs, 1):
        try:
            cell = mat[ref]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: dataset {key!r} entry {number} is not a valid reference ({exc})") from None
        if cell.attrs.get("MATLAB_empty", 0) or cell.size == 0:  # MATLAB writes '' as a uint64 [0 0]
            texts.append("")
        elif cell.dtype.kind not in "ui":
            raise DataError(f"{path}: dataset {key!r} entry {number} is {cell.dtype}, not a MATLAB string")
        else:
            texts.append("".join(chr(code) for code in cell[()].ravel()))
    return texts


def _depth_mm(metres: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres; 0 (no reading) where the value is not finite or not positive."""
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(metres) & (metres > 0)
        mm = np.rint(np.where(valid, metres, 0).astype(np.float64) * 1000)
    return np.clip(mm, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def extract_labeled(path: Path, dest: Path) -> pd.DataFrame:
    """Decode ``nyu_depth_v2_labeled.mat`` at ``path`` into ``dest`` (replaced as a whole; module docstring)."""
    lookup = np.array((0, *CLASS_MAPPING_40), dtype=np.uint8)  # raw 0 (unlabelled) stays 0
    try:
        mat = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path} is not a MATLAB v7.3 (HDF5) file ({exc}); delete it and fetch again") from None
    with mat:
        images = _dataset(mat, "images", path)
        _check(images, path, (None, 3, None, None), "u", "(N, 3, W, H) uint8 RGB")
        count, _, width, height = images.shape
        depths = _dataset(mat, "depths", path)
        _check(depths, path, (count, width, height), "f", f"({count}, {width}, {height}) float depths in metres")
        labels = _dataset(mat, "labels", path)
        _check(labels, path, (count, width, height), "ui", f"({count}, {width}, {height}) integer labels")
        # The mapping is indexed by the raw classes: the file must number them as the mapping does.
        _strings(mat, "names", path, len(CLASS_MAPPING_40))
        scenes = _strings(mat, "sceneTypes", path, count)
        rows = []
        with atomic.atomic_directory(dest) as tmp:
            for folder in ("images", "labels40", "depth"):
                (tmp / folder).mkdir()
            for i in range(count):  # one image at a time: never the whole 2.8 GB in memory
                index = i + 1
                if not scenes[i]:
                    raise DataError(f"{path}: dataset 'sceneTypes' entry {index} is empty (image {index})")
                raw = labels[i].T
                low, high = int(raw.min(initial=0)), int(raw.max(initial=0))
                if low < 0 or high > len(CLASS_MAPPING_40):
                    raise DataError(f"{path}: dataset 'labels' image {index} has raw class {low if low < 0 else high}, "
                                    f"outside 0..{len(CLASS_MAPPING_40)}")
                name = f"{index:04d}.png"
                row = {"index": index, "filename": f"images/{name}", "mask": f"labels40/{name}",
                       "depth": f"depth/{name}", "scene": scenes[i]}
                Image.fromarray(np.ascontiguousarray(images[i].transpose(2, 1, 0)), "RGB").save(tmp / row["filename"])
                Image.fromarray(lookup[raw]).save(tmp / row["mask"])
                Image.fromarray(_depth_mm(depths[i].T)).save(tmp / row["depth"])
                rows.append(row)
            table = pd.DataFrame(rows, columns=["index", "filename", "mask", "depth", "scene"])
            atomic.write_csv(tmp / METADATA, table)
    return table


@register_dataset("nyu_depth_v2")
class NyuDepthV2:
    generated = False

    def fetch(self, dest: Path, *, mirror: Path | None) -> None:
        if (dest / METADATA).is_file():  # extracted once (atomically): nothing to redo
            return
        local = mirror / self.name / LABELED.filename if mirror is not None else None
        if local is not None and local.is_file():  # read in place: no 2.8 GB copy
            verify_checksum(local, LABELED.checksum)
            extract_labeled(local, dest)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{self.name}-fetch-", dir=dest.parent) as tmp:
            extract_labeled(obtain(LABELED, Path(tmp), dataset=self.name, mirror=mirror), dest)

    def manifest(self, root: Path) -> pd.DataFrame:
        meta = read_csv_strict(root / METADATA, required=("index", "filename", "mask", "depth", "scene"),
                               what="NYU Depth V2 metadata (run `transferbench fetch nyu_depth_v2`)")
        return pd.DataFrame({"filename": [(root / name).as_posix() for name in meta["filename"]],
                             "label": meta["scene"].where(meta["scene"] != "", pd.NA), "group": meta["index"],
                             "source_row": range(1, len(meta) + 1),
                             "mask": [(root / name).as_posix() for name in meta["mask"]],
                             "depth": [(root / name).as_posix() for name in meta["depth"]],
                             "scene": meta["scene"]})
