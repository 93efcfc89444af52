"""Split rules on the generated dataset: determinism, each PROTOCOL rule, group disjointness,
and the first-image resolution of a patient whose images span two regions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from transferbench.config import SplitSettings
from transferbench.data.splits import SPLIT_RULES, split_task
from transferbench.data.synthetic import generate
from transferbench.data.layout import manifest_path, split_dir


def _task(settings, **split):
    task = settings.task("synthetic")
    return task.model_copy(update={"split": task.split.model_copy(update=split)})


def _frames(settings, name="synthetic"):
    return {s: pd.read_csv(manifest_path(settings.data, name, s), dtype=str, keep_default_na=False)
            for s in ("train", "val", "test")}


def test_synthetic_is_deterministic_and_small(settings, tmp_path):
    a = generate(settings.data.synthetic, tmp_path / "a")
    generate(settings.data.synthetic, tmp_path / "b")
    assert 120 <= len(a) <= 200 and a["label"].nunique() == 3 and a["location"].nunique() >= 5
    for name in a["filename"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("rule", sorted(SPLIT_RULES))
def test_every_rule_is_deterministic_and_keeps_groups_disjoint(synthetic, rule):
    task = _task(synthetic, rule=rule, test_groups=5, val_groups=3)
    if rule == "official":
        pytest.skip("needs official_split; covered by test_official_rule")
    split_task("synthetic", task, synthetic.data)
    first = {s: manifest_path(synthetic.data, "synthetic", s).read_bytes() for s in ("train", "val", "test")}
    split_task("synthetic", task, synthetic.data)
    assert first == {s: manifest_path(synthetic.data, "synthetic", s).read_bytes() for s in ("train", "val", "test")}
    groups = {s: set(f["group"]) for s, f in _frames(synthetic).items()}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert all(groups.values())


def test_geographic_rule_on_synthetic(synthetic):
    split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    frames = _frames(synthetic)
    assert set(frames["train"]["country"]) == {"Australia", "USA", "Canada"}
    assert set(frames["val"]["region"]) == {"Africa"}
    assert set(frames["test"]["region"]) == {"Europe", "Asia"}
    assert set(frames["train"]["label"]) == {"circle", "square", "triangle"}


def test_random_rule_fractions_and_seed(synthetic):
    summary = split_task("synthetic", _task(synthetic, rule="random", seed=1), synthetic.data)
    assert summary["groups"] == {"train": 30, "val": 3, "test": 3}  # 12 groups per class: 10/1/1
    val_1 = set(_frames(synthetic)["val"]["group"])
    split_task("synthetic", _task(synthetic, rule="random", seed=2), synthetic.data)
    assert set(_frames(synthetic)["val"]["group"]) != val_1


def test_by_group_rule_is_fgnet_split_by_individual(synthetic):
    summary = split_task("synthetic", _task(synthetic, rule="by_group", test_groups=5, val_groups=3), synthetic.data)
    assert summary["groups"] == {"train": 28, "val": 3, "test": 5}


def test_official_rule_keeps_official_test_and_carves_val_from_train(synthetic):
    frame = pd.DataFrame({"group": [f"g{i}" for i in range(40)], "label": ["a", "b"] * 20,
                          "source_row": range(40), "official_split": ["train"] * 30 + ["test"] * 10})
    split, _ = SPLIT_RULES["official"](frame, SplitSettings(rule="official", val_fraction=0.2))
    assert (split[30:] == "test").all()
    assert (split[:30] == "val").sum() == 6 and (split[:30] == "train").sum() == 24


def test_patient_in_two_regions_is_decided_by_first_image(synthetic):
    meta_path = Path(synthetic.data.generated_dir) / "synthetic" / "metadata.csv"
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    # ind000 (Sydney -> train) gets a later image taken in Milan (-> test by region)
    meta.loc[(meta["individual"] == "ind000") & (meta["offset"] == "3"), "location"] = "Milan, Italy"
    meta.to_csv(meta_path, index=False)
    summary = split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    assert summary["group_conflicts"] == [{"group": "ind000", "splits_by_region": ["test", "train"],
                                           "decided_by": str(Path(synthetic.data.generated_dir) /
                                                             "synthetic/images/g000_0.png"),
                                           "split": "train"}]
    frames = _frames(synthetic)
    assert (frames["train"]["group"] == "ind000").sum() == 4 and "ind000" not in set(frames["test"]["group"])


def test_summary_has_the_training_contract(synthetic):
    summary = split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    assert summary["classes"] == sorted(summary["classes"]) == ["circle", "square", "triangle"]
    assert summary["task"] == "synthetic" and summary["dataset"] == "synthetic"
    assert summary["counts"]["val"]["circle"] == {"Africa": 8}
    frames = _frames(synthetic)
    assert list(frames["train"].columns[:3]) == ["filename", "label", "group"]
    assert all(Path(f).is_file() for f in frames["train"]["filename"])  # relative to the working directory
    assert (split_dir(synthetic.data, "synthetic") / "quarantine.csv").is_file()


def test_an_image_changed_under_its_name_changes_the_manifests_so_cache_and_data_version_follow(synthetic):
    from transferbench.engine.data import build_cache, read_manifests
    from transferbench.engine.tasks import kind_for_task

    split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    before = read_manifests(synthetic.data.splits_dir, "synthetic")
    kind = kind_for_task(synthetic.task("synthetic"), before.summary)
    cache = build_cache(before, "train", kind=kind, side=40, cache_dir=synthetic.data.cache_dir)
    version = before.data_version()
    victim, donor = before.frame("train")["filename"].iloc[:2]
    Path(victim).write_bytes(Path(donor).read_bytes())  # same name, same size, another picture
    split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    after = read_manifests(synthetic.data.splits_dir, "synthetic")
    assert after.frame("train").set_index("filename").at[victim, "md5"] == \
        after.frame("train").set_index("filename").at[donor, "md5"]
    assert after.data_version() != version
    assert build_cache(after, "train", kind=kind, side=40, cache_dir=synthetic.data.cache_dir) != cache
