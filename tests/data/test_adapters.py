"""Every registered adapter parses small fixtures written in its upstream on-disk format; fetching
from a mirror verifies checksums; a failed download says how to provide a mirror."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from PIL import Image

from transferbench.data import flowers102
from transferbench.data.fetch import RemoteFile
from transferbench.data.registry import REQUIRED_COLUMNS, get_dataset, list_datasets
from transferbench.errors import DataError
# The newer adapters' upstream layouts are built by their own test modules.
from data.test_nyu_depth_v2 import build_nyu_depth_v2  # noqa: F401
from data.test_oxford5k import build_oxford5k  # noqa: F401
from data.test_wikiart import build_wikiart  # noqa: F401
from engine.test_age import build_fgnet  # noqa: F401


def _jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 36), (120, 30, 200)).save(path, format="JPEG")


def build_flowers102(root: Path) -> dict:
    for i in range(1, 7):
        _jpeg(root / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(root / "imagelabels.mat", {"labels": np.array([[1, 1, 2, 2, 3, 3]])})
    scipy.io.savemat(root / "setid.mat", {"trnid": np.array([[1, 3, 5]]), "valid": np.array([[2]]),
                                          "tstid": np.array([[4, 6]])})
    return {"rows": 6, "labels": {"class_001", "class_002", "class_003"}, "official": {"train": 3, "val": 1, "test": 2}}


def build_cub200(root: Path) -> dict:
    base = root / "CUB_200_2011"
    paths = ["001.Black_footed_Albatross/a_1.jpg", "001.Black_footed_Albatross/a_2.jpg", "002.Laysan_Albatross/b_1.jpg"]
    for p in paths:
        _jpeg(base / "images" / p)
    (base / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(paths, 1)))
    (base / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n")
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    (base / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    return {"rows": 3, "labels": {"001.Black_footed_Albatross", "002.Laysan_Albatross"},
            "official": {"train": 2, "test": 1}}


def build_indoor67(root: Path) -> dict:
    for p in ("kitchen/int1.jpg", "kitchen/int2.jpg", "bar/b1.jpg", "bar/b2.jpg"):
        _jpeg(root / "Images" / p)
    (root / "TrainImages.txt").write_text("kitchen/int1.jpg\nbar/b1.jpg\n")
    (root / "TestImages.txt").write_text("kitchen/int2.jpg\n")
    return {"rows": 4, "labels": {"kitchen", "bar"}, "official": {"train": 2, "test": 1, "": 1}}


def build_caltech101(root: Path) -> dict:
    for p in ("accordion/image_0001.jpg", "accordion/image_0002.jpg", "ant/image_0001.jpg",
              "BACKGROUND_Google/image_0001.jpg"):
        _jpeg(root / "101_ObjectCategories" / p)
    return {"rows": 3, "labels": {"accordion", "ant"}}


def build_covid_chestxray(root: Path) -> dict:
    _jpeg(root / "images" / "a.jpg")
    (root / "metadata.csv").write_text(
        "patientid,offset,finding,view,modality,location,folder,filename,\n"
        "1,0,COVID-19,PA,X-ray,\"Sydney, Australia\",images,a.jpg,\n"
        "1,2,todo,AP,X-ray,,images,b.jpg,\n")
    return {"rows": 2, "labels": {"COVID-19"}}


def build_synthetic(root: Path) -> dict:
    from transferbench.config import SyntheticSettings
    from transferbench.data.synthetic import generate
    generate(SyntheticSettings(groups=3, images_per_group=2, image_size=32), root)
    return {"rows": 6, "labels": {"circle", "square", "triangle"}}


def build_synthetic_b(root: Path) -> dict:
    from transferbench.config import DataSettings
    from transferbench.data.synthetic import generate
    generate(DataSettings().synthetic_b.model_copy(update={"groups": 3, "images_per_group": 2}), root)
    return {"rows": 6, "labels": {"diamond", "cross"}}


def build_synthetic_dense(root: Path) -> dict:
    from transferbench.data.synthetic_dense import generate
    generate(root, images=5, image_size=32)
    return {"rows": 5, "labels": {"scene"}}


def build_synthetic_age(root: Path) -> dict:
    from transferbench.data.synthetic_age import generate
    table = generate(root, individuals=3, images_per_individual=2, max_age=20, image_size=32, seed=0)
    return {"rows": 6, "labels": set(table["age"].astype(str))}


def build_synthetic_retrieval(root: Path) -> dict:
    from transferbench.data.synthetic_retrieval import generate
    generate(root, landmarks=2, views_per_landmark=3, queries_per_landmark=1, distractors=1, image_size=16, seed=0)
    return {"rows": 7, "labels": {"landmark00", "landmark01", "background"}}


BUILDERS = {name: globals()[f"build_{name.replace('-', '_')}"] for name in list_datasets()}


@pytest.mark.parametrize("name", list_datasets())
def test_adapter_parses_its_upstream_format(name, tmp_path):
    expected = BUILDERS[name](tmp_path)
    frame = get_dataset(name).manifest(tmp_path)
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    assert len(frame) == expected["rows"]
    assert set(frame["label"].dropna()) == expected["labels"]
    assert frame["filename"].str.startswith(tmp_path.as_posix()).all()
    if "official" in expected:
        assert frame["official_split"].value_counts().to_dict() == expected["official"]


def test_covid_todo_has_no_label(tmp_path):
    build_covid_chestxray(tmp_path)
    frame = get_dataset("covid-chestxray").manifest(tmp_path)
    assert frame["label"].isna().tolist() == [False, True]
    assert frame["exclude"].tolist()[1] == "no_label" and frame["group"].nunique() == 1


def _tgz_of(source: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname=arcname)
    return buffer.getvalue()


def test_fetch_from_mirror_verifies_checksums(tmp_path, monkeypatch):
    upstream = tmp_path / "upstream"
    build_flowers102(upstream)
    mirror = tmp_path / "mirror" / "flowers102"
    mirror.mkdir(parents=True)
    (mirror / "102flowers.tgz").write_bytes(_tgz_of(upstream / "jpg", "jpg"))
    for name in ("imagelabels.mat", "setid.mat"):
        (mirror / name).write_bytes((upstream / name).read_bytes())
    files = tuple(RemoteFile(f.url, f.filename, "md5:" + hashlib.md5((mirror / f.filename).read_bytes()).hexdigest())
                  for f in flowers102.FILES)
    monkeypatch.setattr(flowers102, "FILES", files)
    dest = tmp_path / "raw" / "flowers102"
    get_dataset("flowers102").fetch(dest, mirror=tmp_path / "mirror")
    assert len(get_dataset("flowers102").manifest(dest)) == 6

    (mirror / "setid.mat").write_bytes(b"not the pinned file")
    with pytest.raises(DataError, match=r"checksum mismatch for .*setid\.mat"):
        get_dataset("flowers102").fetch(tmp_path / "raw2" / "flowers102", mirror=tmp_path / "mirror")


def test_download_failure_says_how_to_provide_a_mirror(tmp_path, monkeypatch):
    monkeypatch.setattr(flowers102, "FILES", (RemoteFile("file:///nonexistent/102flowers.tgz", "102flowers.tgz",
                                                         None),))
    with pytest.raises(DataError, match=r"could not be downloaded.*TRANSFERBENCH_DATA_MIRROR/flowers102/"):
        get_dataset("flowers102").fetch(tmp_path / "flowers102", mirror=None)


def test_covid_mirror_with_bad_checksum_is_refused(tmp_path, covid_mirror):
    mirror = tmp_path / "mirror" / "covid-chestxray"
    mirror.mkdir(parents=True)
    sums = (covid_mirror / "covid-chestxray/SHA256SUMS").read_text().splitlines()[:3]
    (mirror / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    (mirror / "metadata.csv").write_text("x")
    with pytest.raises(DataError, match="not the pinned upstream version"):
        get_dataset("covid-chestxray").fetch(tmp_path / "raw", mirror=tmp_path / "mirror")
