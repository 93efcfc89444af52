"""The nyu_depth_v2 adapter decodes nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5, arrays transposed, strings
as references to uint16 character arrays) into RGB / 40-class mask / millimetre depth PNGs, and names the
file and key of a dataset that is missing or malformed. The fixture is written here in MATLAB's layout."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transferbench.data import nyu_depth_v2
from transferbench.data.fetch import RemoteFile
from transferbench.data.registry import REQUIRED_COLUMNS, get_dataset
from transferbench.errors import DataError

COUNT, HEIGHT, WIDTH = 6, 16, 20
SCENES = ("kitchen", "bedroom", "bathroom", "living_room", "kitchen", "office")
# (raw class, its name in NYU's `names`, its class in the published 40-class mapping)
KNOWN = ((21, "wall", 1), (11, "floor", 2), (4, "ceiling", 22), (85, "books", 23), (331, "person", 31),
         (1, "book", 40), (894, "torah", 40))
RED_AT = (3, 17)  # (row, col) of a red pixel in image 1: tells height from width after the transpose


def _ground_truth() -> dict[str, np.ndarray]:
    """The fixture's content as images are seen (row, col), before MATLAB's transposed storage."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, size=(COUNT, HEIGHT, WIDTH, 3), dtype=np.uint8)
    images[0][RED_AT] = (255, 0, 0)
    labels = rng.integers(0, 895, size=(COUNT, HEIGHT, WIDTH)).astype(np.uint16)
    labels[:, 0, 0] = 0  # unlabelled
    for i, (raw, _, _) in enumerate(KNOWN):
        labels[0, 1, i] = raw
    depths = rng.uniform(0.5, 9.5, size=(COUNT, HEIGHT, WIDTH)).astype(np.float32)
    depths[0, 0, :4] = (np.nan, 0.0, -1.0, np.inf)  # no reading, in each form it takes
    depths[0, 2, 0] = 2.5
    return {"images": images, "labels": labels, "depths": depths}


def _matlab_string(refs: h5py.Group, name: str, text: str) -> h5py.Reference:
    """A MATLAB char array as v7.3 stores a cell's string: uint16 codes, (length, 1) in h5py's view."""
    cell = refs.create_dataset(name, data=np.array([[ord(c)] for c in text], dtype=np.uint16))
    cell.attrs["MATLAB_class"] = np.bytes_("char")
    return cell.ref


def _cell_array(mat: h5py.File, refs: h5py.Group, key: str, texts: list[str]) -> None:
    cells = mat.create_dataset(key, shape=(1, len(texts)), dtype=h5py.ref_dtype)
    for i, text in enumerate(texts):
        cells[0, i] = _matlab_string(refs, f"{key}_{i}", text)
    cells.attrs["MATLAB_class"] = np.bytes_("cell")


def write_labeled_mat(path: Path, *, drop: str | None = None, replace: dict | None = None) -> dict[str, np.ndarray]:
    """nyu_depth_v2_labeled.mat in miniature, in the real file's layout; ``drop`` leaves a key out,
    ``replace`` writes other arrays under some keys. Returns the ground truth (row, col orientation)."""
    truth = _ground_truth()
    names = [f"raw class {i}" for i in range(1, 895)]
    for raw, name, _ in KNOWN:
        names[raw - 1] = name
    arrays = {"images": truth["images"].transpose(0, 3, 2, 1),  # (N, H, W, C) -> MATLAB's (N, C, W, H)
              "depths": truth["depths"].transpose(0, 2, 1), "labels": truth["labels"].transpose(0, 2, 1)}
    arrays.update(replace or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as mat:
        refs = mat.create_group("#refs#")
        for key, array in arrays.items():
            if key != drop:
                mat.create_dataset(key, data=array)
        if drop != "sceneTypes":
            _cell_array(mat, refs, "sceneTypes", list(SCENES))
        if drop != "names":
            _cell_array(mat, refs, "names", names)
    return truth


def build_nyu_depth_v2(root: Path) -> dict:
    """The extracted layout under ``root`` (for the registry-wide adapter test)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_labeled_mat(Path(tmp) / "nyu_depth_v2_labeled.mat")
        nyu_depth_v2.extract_labeled(Path(tmp) / "nyu_depth_v2_labeled.mat", root)
    return {"rows": COUNT, "labels": set(SCENES)}


@pytest.fixture
def mirror(tmp_path) -> tuple[Path, dict]:
    truth = write_labeled_mat(tmp_path / "mirror" / "nyu_depth_v2" / "nyu_depth_v2_labeled.mat")
    return tmp_path / "mirror", truth


def test_the_mapping_is_the_published_894_to_40_table():
    mapping = nyu_depth_v2.CLASS_MAPPING_40
    assert len(mapping) == 894 and set(mapping) == set(range(1, 41))
    assert len(nyu_depth_v2.CLASS_NAMES_40) == 40 and nyu_depth_v2.CLASS_NAMES_40[22] == "books"
    for raw, name, label in KNOWN:  # each named raw class maps to the 40-class label of that name
        assert mapping[raw - 1] == label
        assert label == 40 or nyu_depth_v2.CLASS_NAMES_40[label - 1] == name


def test_fetch_extracts_images_masks_and_depth_in_millimetres(tmp_path, mirror):
    root, truth = mirror
    dest = tmp_path / "raw" / "nyu_depth_v2"
    get_dataset("nyu_depth_v2").fetch(dest, mirror=root)
    assert sorted(p.name for p in (dest / "images").iterdir()) == [f"{i:04d}.png" for i in range(1, COUNT + 1)]
    assert len(list((dest / "labels40").iterdir())) == len(list((dest / "depth").iterdir())) == COUNT

    with Image.open(dest / "images/0001.png") as image:
        assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
        rgb = np.asarray(image)
    assert tuple(rgb[RED_AT]) == (255, 0, 0) and np.array_equal(rgb, truth["images"][0])

    with Image.open(dest / "labels40/0001.png") as image:
        assert image.mode == "L" and image.size == (WIDTH, HEIGHT)
        mask = np.asarray(image)
    assert mask[0, 0] == 0  # unlabelled stays 0
    assert [int(mask[1, i]) for i in range(len(KNOWN))] == [label for _, _, label in KNOWN]
    lookup = np.array((0, *nyu_depth_v2.CLASS_MAPPING_40))
    assert np.array_equal(mask, lookup[truth["labels"][0]]) and 1 <= mask[1:].min() and mask.max() <= 40

    with Image.open(dest / "depth/0001.png") as image:
        assert image.mode == "I;16" and image.size == (WIDTH, HEIGHT)
        depth = np.asarray(image)
    assert depth[0, :4].tolist() == [0, 0, 0, 0] and depth[2, 0] == 2500
    assert np.array_equal(depth[3:], np.rint(truth["depths"][0, 3:].astype(np.float64) * 1000))

    meta = pd.read_csv(dest / "metadata.csv", dtype=str)
    assert list(meta.columns) == ["index", "filename", "mask", "depth", "scene"]
    assert tuple(meta["scene"]) == SCENES and meta["mask"].iloc[2] == "labels40/0003.png"


def test_manifest_has_scene_labels_and_the_dense_columns(tmp_path, mirror):
    dest = tmp_path / "raw" / "nyu_depth_v2"
    get_dataset("nyu_depth_v2").fetch(dest, mirror=mirror[0])
    frame = get_dataset("nyu_depth_v2").manifest(dest)
    assert set(REQUIRED_COLUMNS) | {"mask", "depth"} <= set(frame.columns) and len(frame) == COUNT
    assert tuple(frame["label"]) == SCENES and frame["group"].tolist() == [str(i) for i in range(1, COUNT + 1)]
    for column in ("filename", "mask", "depth"):
        assert frame[column].str.startswith(dest.as_posix()).all()
        assert all(Path(p).is_file() for p in frame[column])


def test_fetch_extracts_once(tmp_path, mirror):
    dest = tmp_path / "raw" / "nyu_depth_v2"
    get_dataset("nyu_depth_v2").fetch(dest, mirror=mirror[0])
    stamp = (dest / "metadata.csv").stat().st_mtime_ns
    get_dataset("nyu_depth_v2").fetch(dest, mirror=None)  # no mirror, no network: nothing to do
    assert (dest / "metadata.csv").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("key", ["images", "depths", "labels", "sceneTypes", "names"])
def test_a_missing_dataset_names_the_file_and_key(tmp_path, key):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    write_labeled_mat(mat, drop=key)
    with pytest.raises(DataError, match=rf"nyu_depth_v2_labeled\.mat: no dataset '{key}'"):
        nyu_depth_v2.extract_labeled(mat, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "array"), [
    ("depths", np.zeros((COUNT, WIDTH, HEIGHT + 1), dtype=np.float32)),  # not the images' size
    ("labels", np.zeros((COUNT, WIDTH, HEIGHT), dtype=np.float32)),  # not integers
    ("images", np.zeros((COUNT, 1, WIDTH, HEIGHT), dtype=np.uint8)),  # not RGB
])
def test_a_malformed_dataset_names_the_file_and_key(tmp_path, key, array):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    write_labeled_mat(mat, replace={key: array})
    with pytest.raises(DataError, match=rf"nyu_depth_v2_labeled\.mat: dataset '{key}' is"):
        nyu_depth_v2.extract_labeled(mat, tmp_path / "out")


def test_a_raw_class_beyond_894_is_refused(tmp_path):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    labels = np.full((COUNT, WIDTH, HEIGHT), 895, dtype=np.uint16)
    write_labeled_mat(mat, replace={"labels": labels})
    with pytest.raises(DataError, match=r"dataset 'labels' image 1 has raw class 895"):
        nyu_depth_v2.extract_labeled(mat, tmp_path / "out")


def test_a_file_that_is_not_hdf5_is_refused(tmp_path):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, not v7.3")
    with pytest.raises(DataError, match=r"nyu_depth_v2_labeled\.mat is not a MATLAB v7\.3 \(HDF5\) file"):
        nyu_depth_v2.extract_labeled(mat, tmp_path / "out")


def test_no_mirror_and_no_download_says_how_to_provide_one(tmp_path, monkeypatch):
    monkeypatch.setattr(nyu_depth_v2, "LABELED", RemoteFile("file:///nonexistent/nyu_depth_v2_labeled.mat",
                                                            "nyu_depth_v2_labeled.mat", None))
    with pytest.raises(DataError, match=r"could not be downloaded.*TRANSFERBENCH_DATA_MIRROR/nyu_depth_v2/"):
        get_dataset("nyu_depth_v2").fetch(tmp_path / "raw" / "nyu_depth_v2", mirror=tmp_path / "empty-mirror")
    assert not (tmp_path / "raw" / "nyu_depth_v2").exists()
