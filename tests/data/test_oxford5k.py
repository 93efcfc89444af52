"""The oxford5k adapter reads the upstream layout (images/ + gt_files/ query, good, ok, junk lists) and
names the file and line of bad ground truth; synthetic_retrieval is written in that layout,
byte-identical for the same arguments."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from transferbench.data import oxford5k
from transferbench.data.oxford5k import Query, ground_truth
from transferbench.data.registry import REQUIRED_COLUMNS, get_dataset
from transferbench.data.synthetic_retrieval import generate
from transferbench.errors import DataError

STEMS = ("all_souls_000001", "all_souls_000002", "all_souls_000003", "all_souls_000004",
         "radcliffe_camera_000001", "radcliffe_camera_000002", "christ_church_000001")


def build_oxford5k(root: Path) -> dict:
    """Seven tiny JPEGs and two queries in the layout of oxbuild_images + gt_files_170407."""
    (root / "images").mkdir(parents=True)
    for i, stem in enumerate(STEMS):
        Image.new("RGB", (48, 40), (30 * i, 100, 200 - 20 * i)).save(root / "images" / f"{stem}.jpg", format="JPEG")
    gt = root / "gt_files"
    gt.mkdir()
    files = {
        "all_souls_1_query.txt": "oxc1_all_souls_000001 4.5 3.0 40.25 36.0\n",
        "all_souls_1_good.txt": "all_souls_000001\nall_souls_000002\n",
        "all_souls_1_ok.txt": "all_souls_000003\n",
        "all_souls_1_junk.txt": "all_souls_000004\n",
        "radcliffe_camera_1_query.txt": "oxc1_radcliffe_camera_000002 0 0 20 20\n",
        "radcliffe_camera_1_good.txt": "radcliffe_camera_000001\nradcliffe_camera_000002\n",
        "radcliffe_camera_1_ok.txt": "",
        "radcliffe_camera_1_junk.txt": "",
    }
    for name, text in files.items():
        (gt / name).write_text(text)
    return {"rows": len(STEMS), "labels": {"all_souls", "radcliffe_camera", "background"}}


def test_ground_truth_is_parsed_from_the_upstream_layout(tmp_path):
    build_oxford5k(tmp_path)
    queries = get_dataset("oxford5k").ground_truth(tmp_path)
    assert [q.name for q in queries] == ["all_souls_1", "radcliffe_camera_1"]
    assert queries[0] == Query("all_souls_1", "all_souls_000001", (4.5, 3.0, 40.25, 36.0),
                               good=frozenset({"all_souls_000001", "all_souls_000002"}),
                               ok=frozenset({"all_souls_000003"}), junk=frozenset({"all_souls_000004"}))
    assert queries[0].positives == {"all_souls_000001", "all_souls_000002", "all_souls_000003"}
    assert queries[1].ok == frozenset() and queries[1].junk == frozenset()


def test_manifest_has_one_row_per_database_image(tmp_path):
    build_oxford5k(tmp_path)
    frame = get_dataset("oxford5k").manifest(tmp_path)
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    assert frame["image_id"].tolist() == sorted(STEMS)
    assert frame["group"].is_unique and frame["filename"].str.endswith(".jpg").all()
    by_stem = frame.set_index("image_id")
    assert by_stem.loc["all_souls_000003", "label"] == "all_souls"  # ok counts as a positive
    assert by_stem.loc["all_souls_000004", "label"] == "background"  # junk only
    assert by_stem.loc["christ_church_000001", "label"] == "background"
    assert by_stem.loc["radcliffe_camera_000002", "query"] == "radcliffe_camera_1"
    assert frame["source_row"].tolist() == list(range(1, len(STEMS) + 1))


@pytest.mark.parametrize(("name", "text", "error"), [
    ("all_souls_1_query.txt", "oxc1_all_souls_000001 4.5 3.0 forty 36.0\n",
     r"all_souls_1_query\.txt:1: malformed query line"),
    ("all_souls_1_query.txt", "\noxc1_all_souls_000001 4.5 3.0\n", r"all_souls_1_query\.txt:2: malformed query line"),
    ("all_souls_1_query.txt", "oxc1_all_souls_000001 40 3 4 36\n", r"all_souls_1_query\.txt:1: empty query box"),
    ("all_souls_1_query.txt", "oxc1_all_souls_999999 1 1 9 9\n",
     r"all_souls_1_query\.txt:1: query image 'all_souls_999999' is not in the database"),
    ("all_souls_1_good.txt", "all_souls_000001\n\nall_souls_000009\n",
     r"all_souls_1_good\.txt:3: image 'all_souls_000009' is not in the database"),
    ("magdalen_2_good.txt", "all_souls_000001\n", r"query 'magdalen_2' lacks magdalen_2_query\.txt"),
    ("README.txt", "notes\n", r"README\.txt: not a ground-truth file name"),
])
def test_bad_ground_truth_names_the_file_and_line(tmp_path, name, text, error):
    build_oxford5k(tmp_path)
    (tmp_path / "gt_files" / name).write_text(text)
    with pytest.raises(DataError, match=error):
        ground_truth(tmp_path)


def test_a_query_without_its_lists_is_refused(tmp_path):
    build_oxford5k(tmp_path)
    (tmp_path / "gt_files" / "all_souls_1_junk.txt").unlink()
    with pytest.raises(DataError, match=r"query 'all_souls_1' lacks all_souls_1_junk\.txt"):
        get_dataset("oxford5k").manifest(tmp_path)


def _tgz_of_files(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)  # both upstream archives are flat
    return buffer.getvalue()


def test_fetch_from_a_mirror_extracts_images_and_ground_truth(tmp_path):
    upstream = tmp_path / "upstream"
    build_oxford5k(upstream)
    mirror = tmp_path / "mirror" / "oxford5k"
    mirror.mkdir(parents=True)
    (mirror / oxford5k.IMAGES.filename).write_bytes(_tgz_of_files(upstream / "images"))
    (mirror / oxford5k.GROUND_TRUTH.filename).write_bytes(_tgz_of_files(upstream / "gt_files"))
    dest = tmp_path / "raw" / "oxford5k"
    get_dataset("oxford5k").fetch(dest, mirror=tmp_path / "mirror")
    assert len(get_dataset("oxford5k").manifest(dest)) == len(STEMS)
    assert [q.name for q in ground_truth(dest)] == ["all_souls_1", "radcliffe_camera_1"]


SMALL = dict(landmarks=3, views_per_landmark=6, queries_per_landmark=2, distractors=4, image_size=32, seed=5)


def test_synthetic_retrieval_is_deterministic_and_in_the_oxford_layout(tmp_path):
    table = generate(tmp_path / "a", **SMALL)
    generate(tmp_path / "b", **SMALL)
    first, second = ground_truth(tmp_path / "a"), ground_truth(tmp_path / "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert first == second
    assert len(first) == 3 * 2 and len(table) == len(list((tmp_path / "a" / "images").iterdir())) == 3 * 6 + 4
    assert (tmp_path / "a" / "gt_files" / "landmark00_1_query.txt").read_text().startswith("oxc1_landmark00_000 ")
    for q in first:
        assert q.image in q.good and q.ok and q.junk  # every role is present at this size
        assert not (q.positives & q.junk)
    generate(tmp_path / "c", **{**SMALL, "seed": 6})
    assert (tmp_path / "c" / "images" / "landmark00_000.png").read_bytes() != \
        (tmp_path / "a" / "images" / "landmark00_000.png").read_bytes()
    assert [q.name for q in ground_truth(tmp_path / "c")] == [q.name for q in first]


def test_synthetic_retrieval_adapter_reuses_the_oxford_parser(tmp_path):
    generate(tmp_path, **SMALL)
    adapter = get_dataset("synthetic_retrieval")
    assert adapter.generated
    frame = adapter.manifest(tmp_path)
    assert len(frame) == 3 * 6 + 4
    assert set(frame["label"]) == {"landmark00", "landmark01", "landmark02", "background"}
    assert (frame["label"] == "background").sum() == 4 + 3 * 1  # distractors + one junk view per landmark
    assert adapter.ground_truth(tmp_path) == ground_truth(tmp_path)
    with pytest.raises(DataError, match="generated, not fetched"):
        adapter.fetch(tmp_path / "x", mirror=None)
    with pytest.raises(DataError, match="queries_per_landmark"):
        generate(tmp_path / "bad", **{**SMALL, "queries_per_landmark": 6})
