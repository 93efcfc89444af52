"""covid_geo on the real offline mirror: fetch, the geographic split, exclusions and switches."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from transferbench.config import GeographicRule
from transferbench.data.registry import get_dataset
from transferbench.data.splits import split_task
from transferbench.data.layout import manifest_path, split_dir

AMERICAS_NOT_USA = {"Canada", "Guatemala", "Colombia", "Brazil", "Argentina"}


def _read(settings, task="covid_geo"):
    return {s: pd.read_csv(manifest_path(settings.data, task, s), dtype=str, keep_default_na=False)
            for s in ("train", "val", "test")}


def test_fetch_is_verified_and_idempotent(covid, covid_mirror):
    root = Path(covid.data.raw_dir) / "covid-chestxray"
    assert len(list((root / "images").iterdir())) == 724
    before = {p: p.stat().st_mtime_ns for p in (root / "images").iterdir()}
    get_dataset("covid-chestxray").fetch(root, mirror=covid_mirror)
    assert {p: p.stat().st_mtime_ns for p in (root / "images").iterdir()} == before
    (root / "images" / "000001-12.jpg").write_bytes(b"tampered")  # a damaged copy is replaced
    get_dataset("covid-chestxray").fetch(root, mirror=covid_mirror)
    assert (root / "images" / "000001-12.jpg").read_bytes() == (covid_mirror / "covid-chestxray/images/000001-12.jpg").read_bytes()


def test_geographic_split_on_the_mirror(covid):
    summary = split_task("covid_geo", covid.task("covid_geo"), covid.data)
    frames = _read(covid)
    assert set(frames["train"]["region"]) == {"Oceania", "Americas"}
    assert set(frames["val"]["region"]) == {"Africa"}
    assert set(frames["test"]["region"]) <= {"Europe", "Asia"} and len(frames["test"]) > 300
    groups = [set(f["group"]) for f in frames.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert summary["classes"] == ["COVID-19", "other"]
    assert set(frames["train"]["label"]) == {"COVID-19", "other"}
    # "COVID-19, ARDS" counts as COVID-19
    assert "COVID-19, ARDS" in set(pd.concat(frames.values())["finding"])
    # every source row is in a split or in the quarantine list, with its reason
    quarantine = pd.read_csv(split_dir(covid.data, "covid_geo") / "quarantine.csv", dtype=str, keep_default_na=False)
    assert sum(len(f) for f in frames.values()) + len(quarantine) == summary["source_rows"] == 751
    assert summary["excluded"]["modality"] == 84 and summary["excluded_detail"]["modality"] == {"CT": 84}
    assert summary["excluded_detail"]["no_label"] == {"todo": summary["excluded"]["no_label"]}
    assert summary["excluded"]["missing_image"] > 0 and summary["excluded"]["no_location"] > 0
    assert summary["excluded"]["view"] > 0
    missing = {line.strip() for line in (Path(covid.data.raw_dir) / "covid-chestxray/MISSING_IMAGES.txt")
               .read_text().splitlines() if line.strip()}
    listed = {Path(f).name for f in quarantine["filename"]}
    assert {Path(m).name for m in missing} <= listed
    assert (quarantine.loc[quarantine["reason"] == "missing_image", "detail"].str.contains("no file at")).all()
    counts = json.loads((split_dir(covid.data, "covid_geo") / "summary.json").read_text())["counts"]
    assert sum(n for c in counts["val"].values() for n in c.values()) == len(frames["val"])


def test_usa_only_switch_moves_the_rest_of_the_americas_to_test(covid):
    task = covid.task("covid_geo")
    rule = task.split.geographic.model_copy(update={"america": "usa"})
    task = task.model_copy(update={"split": task.split.model_copy(update={"geographic": rule})})
    split_task("covid_geo", task, covid.data)
    frames = _read(covid)
    assert set(frames["train"].loc[frames["train"]["region"] == "Americas", "country"]) == {"USA"}
    assert set(frames["test"]["country"]) & AMERICAS_NOT_USA


def test_unknown_location_can_go_to_test(covid):
    task = covid.task("covid_geo")
    rule = GeographicRule(unknown_location="test")
    task = task.model_copy(update={"split": task.split.model_copy(update={"geographic": rule})})
    summary = split_task("covid_geo", task, covid.data)
    assert "no_location" not in summary["excluded"]
    assert (_read(covid)["test"]["region"] == "").any()
