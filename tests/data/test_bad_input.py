"""Bad input never passes silently: each case is quarantined with its reason (and logged naming
the row) or stops with a DataError naming the file; nothing written is left half-written."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from transferbench.data.splits import split_task
from transferbench.errors import DataError
from transferbench.data.layout import split_dir


def _root(settings) -> Path:
    return Path(settings.data.generated_dir) / "synthetic"


def _quarantine(settings) -> pd.DataFrame:
    return pd.read_csv(split_dir(settings.data, "synthetic") / "quarantine.csv", dtype=str, keep_default_na=False)


def _edit_meta(settings, row: int, **values) -> None:
    path = _root(settings) / "metadata.csv"
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    for key, value in values.items():
        meta.loc[row, key] = value
    meta.to_csv(path, index=False)


def _damage(settings, image: str, data: bytes | None) -> str:
    path = _root(settings) / "images" / image
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    return path.as_posix()


CASES = {
    "missing_image": lambda s: _damage(s, "g001_0.png", None),
    "empty_file": lambda s: _damage(s, "g001_0.png", b""),
    "corrupt_image": lambda s: _damage(s, "g001_0.png", b"\x89PNG\r\n\x1a\n not really a png"),
    "truncated": lambda s: _damage(s, "g001_0.png", (_root(s) / "images/g001_0.png").read_bytes()[:300]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_image_is_quarantined_and_named(synthetic, case, caplog):
    filename = CASES[case](synthetic)
    with caplog.at_level(logging.WARNING, logger="transferbench"):
        summary = split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    reason = "corrupt_image" if case == "truncated" else case
    quarantine = _quarantine(synthetic)
    assert quarantine[["reason", "filename"]].values.tolist() == [[reason, filename]]
    assert summary["excluded"] == {reason: 1} and summary["rows"]["train"] + summary["rows"]["val"] + \
        summary["rows"]["test"] == 143
    assert any(filename in r.getMessage() or "source row 5 " in r.getMessage() for r in caplog.records)


def test_too_small_image_is_quarantined(synthetic):
    from PIL import Image
    Image.new("RGB", (20, 20)).save(_root(synthetic) / "images/g002_1.png")
    summary = split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    assert summary["excluded"] == {"too_small": 1}
    assert "smaller than min_image_side=32" in _quarantine(synthetic)["detail"][0]


def test_unknown_label_and_unknown_region_are_quarantined(synthetic):
    _edit_meta(synthetic, 0, label="hexagon")
    _edit_meta(synthetic, 9, location="Emerald City, Oz")
    summary = split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    assert summary["excluded"] == {"unknown_label": 1, "unknown_region": 1}
    details = dict(zip(_quarantine(synthetic)["reason"], _quarantine(synthetic)["detail"]))
    assert "'hexagon'" in details["unknown_label"] and "'Oz'" in details["unknown_region"]


def test_empty_location_is_excluded_and_counted(synthetic):
    _edit_meta(synthetic, 3, location="")
    _edit_meta(synthetic, 4, location="?")
    assert split_task("synthetic", synthetic.task("synthetic"), synthetic.data)["excluded"] == {"no_location": 2}


def test_malformed_csv_names_the_file_and_leaves_previous_split_intact(synthetic):
    split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    train = split_dir(synthetic.data, "synthetic") / "train.csv"
    before = train.read_bytes()
    meta = _root(synthetic) / "metadata.csv"
    lines = meta.read_text().splitlines()
    lines[7] += ",extra,fields"
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"malformed CSV .*metadata\.csv.*line 8"):
        split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    assert train.read_bytes() == before
    assert not [p for p in split_dir(synthetic.data, "synthetic").parent.iterdir() if p.name.startswith(".")]


def test_missing_column_and_missing_dataset_are_clear(synthetic):
    meta = _root(synthetic) / "metadata.csv"
    pd.read_csv(meta).drop(columns=["location"]).to_csv(meta, index=False)
    with pytest.raises(DataError, match=r"missing required columns \['location'\]"):
        split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    meta.unlink()
    with pytest.raises(DataError, match="synthetic metadata not found"):
        split_task("synthetic", synthetic.task("synthetic"), synthetic.data)


def test_atomic_directory_keeps_old_content_when_writing_fails(tmp_path):
    from transferbench.atomic import atomic_directory
    target = tmp_path / "task"
    target.mkdir()
    (target / "train.csv").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "train.csv").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "train.csv").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["task"]
