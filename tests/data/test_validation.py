"""great-expectations validation: passes on good splits, fails naming the expectation and rows
on a patient in two splits and on a corrupt image; a tiny split only warns."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from transferbench.data.splits import split_task
from transferbench.data.validation import validate_task
from transferbench.errors import DataError
from transferbench.data.layout import manifest_path

pytestmark = pytest.mark.slow  # great-expectations takes a few seconds per run


@pytest.fixture
def split_synthetic(synthetic):
    split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    return synthetic


def _report(settings, name="synthetic"):
    return json.loads((Path(settings.data.reports_dir) / "validation" / f"{name}.json").read_text())


def test_passes_and_writes_reports(split_synthetic):
    report = validate_task("synthetic", split_synthetic.task("synthetic"), split_synthetic.data)
    assert report["success"] and not report["errors"] and report["checked"] > 40
    assert _report(split_synthetic)["success"]
    assert "PASSED" in (Path(split_synthetic.data.reports_dir) / "validation/synthetic.md").read_text()


def test_patient_in_two_splits_fails_naming_the_expectation(split_synthetic):
    s = split_synthetic
    train, test = (pd.read_csv(manifest_path(s.data, "synthetic", x), dtype=str, keep_default_na=False)
                   for x in ("train", "test"))
    leaked = train.iloc[[0]].assign(filename=test["filename"].iloc[0])
    test = pd.concat([test.iloc[1:], leaked.assign(filename=train["filename"].iloc[1])])
    test.to_csv(manifest_path(s.data, "synthetic", "test"), index=False)
    with pytest.raises(DataError) as info:
        validate_task("synthetic", s.task("synthetic"), s.data)
    message = str(info.value)
    assert "expect_column_values_to_be_unique(column='group')" in message
    assert train["group"].iloc[0] in message
    assert not _report(s)["success"]


def test_corrupt_image_fails_naming_the_file(split_synthetic):
    s = split_synthetic
    victim = pd.read_csv(manifest_path(s.data, "synthetic", "val"))["filename"].iloc[0]
    Path(victim).write_bytes(b"GIF89a truncated")
    with pytest.raises(DataError) as info:
        validate_task("synthetic", s.task("synthetic"), s.data)
    assert "column='image_check'" in str(info.value) and victim in str(info.value)


def test_region_rule_violation_and_missing_class_fail(split_synthetic):
    s = split_synthetic
    train = pd.read_csv(manifest_path(s.data, "synthetic", "train"), dtype=str, keep_default_na=False)
    train = train[train["label"] != "circle"]
    train.to_csv(manifest_path(s.data, "synthetic", "train"), index=False)
    val = pd.read_csv(manifest_path(s.data, "synthetic", "val"), dtype=str, keep_default_na=False)
    pd.concat([val, pd.read_csv(manifest_path(s.data, "synthetic", "test"), dtype=str,
                                keep_default_na=False).iloc[[0]]]).to_csv(manifest_path(s.data, "synthetic", "val"),
                                                                          index=False)
    with pytest.raises(DataError) as info:
        validate_task("synthetic", s.task("synthetic"), s.data)
    message = str(info.value)
    assert "expect_column_distinct_values_to_contain_set(column='label'" in message
    assert "[val] expect_column_values_to_be_in_set(column='region'" in message
    assert "expect_column_pair_values_to_be_equal" in message


def test_tiny_val_only_warns(split_synthetic):
    s = split_synthetic
    val = pd.read_csv(manifest_path(s.data, "synthetic", "val"), dtype=str, keep_default_na=False)
    val.iloc[:3].to_csv(manifest_path(s.data, "synthetic", "val"), index=False)
    report = validate_task("synthetic", s.task("synthetic"), s.data)
    assert report["success"] and any("[val] expect_table_row_count_to_be_between" in w for w in report["warnings"])


def test_real_mirror_validates(covid):
    split_task("covid_geo", covid.task("covid_geo"), covid.data)
    report = validate_task("covid_geo", covid.task("covid_geo"), covid.data)
    assert report["success"]
    assert any("[val] expect_table_row_count_to_be_between" in w for w in report["warnings"])  # Africa: 3 images


def test_an_image_replaced_after_the_split_fails_naming_the_file(split_synthetic):
    s = split_synthetic
    train = pd.read_csv(manifest_path(s.data, "synthetic", "train"))
    victim, donor = train["filename"].iloc[0], train["filename"].iloc[1]
    Path(victim).write_bytes(Path(donor).read_bytes())  # a valid image, but not the one the split saw
    with pytest.raises(DataError) as info:
        validate_task("synthetic", s.task("synthetic"), s.data)
    assert "changed_since_split" in str(info.value) and victim in str(info.value)
