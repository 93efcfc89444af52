"""Rank tables: per-task ranks (ties, direction), family averages, significance, and the report files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from study_files import metrics_record
from transferbench.cli import main
from transferbench.config import BackboneSettings
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.ranking import rank_scores, rank_table
from transferbench.evaluation.results import (
    EvaluationSpec,
    FinetuneResult,
    ResultsError,
    read_result,
    read_study_results,
)
from transferbench.evaluation.significance import critical_difference

ACCURACY = MetricSpec("accuracy")

CATALOGUE = {
    "test_resnet": BackboneSettings(model="test_resnet", family="convnet", weights="none"),
    "test_convnext": BackboneSettings(model="test_convnext", family="convnet", weights="hub", imagenet_top1=80.0),
    "test_vit": BackboneSettings(model="test_vit", family="transformer", weights="none"),
    "test_vit2": BackboneSettings(model="test_vit2", family="transformer", weights="file:ckpt.pt"),
}


def _results(scores: dict[str, dict[str, list[float]]], metrics: dict[str, str]) -> list[FinetuneResult]:
    out = []
    for task, per_backbone in scores.items():
        for backbone, values in per_backbone.items():
            for seed, value in enumerate(values):
                raw = metrics_record(task, backbone, seed, metrics[task], value)
                out.append(FinetuneResult(Path("x.json"), raw["task"], raw["mode"], backbone, raw["family"],
                                          raw["weights"], seed, raw["mlflow_run_id"], metrics[task], value, value,
                                          raw))
    return out


def test_ranks_ties_share_the_average_rank():
    assert rank_scores({"a": 0.9, "b": 0.8, "c": 0.8, "d": 0.1}, higher_better=True) == {
        "a": 1.0, "b": 2.5, "c": 2.5, "d": 4.0}
    # a float-summation difference is not a real difference
    assert rank_scores({"a": (0.1 + 0.2) / 3, "b": 0.3 / 3}, higher_better=True) == {"a": 1.5, "b": 1.5}


def test_lower_is_better_metric_ranks_the_smallest_first():
    scores = {"age": {"test_resnet": [3.0, 3.2], "test_vit": [5.0, 5.5]}}
    table = rank_table(_results(scores, {"age": "mae"}), study="s",
                       task_metrics={"age": MetricSpec("mae", higher_is_better=False)},
                       backbones={b: CATALOGUE[b] for b in ("test_resnet", "test_vit")})
    assert table["tasks"]["age"]["higher_is_better"] is False
    assert table["tasks"]["age"]["backbones"]["test_resnet"]["rank"] == 1.0
    assert table["tasks"]["age"]["backbones"]["test_vit"]["rank"] == 2.0


def test_family_and_average_ranks():
    scores = {
        "t1": {"test_resnet": [0.9, 0.8], "test_convnext": [0.5, 0.5], "test_vit": [0.7, 0.7], "test_vit2": [0.1, 0.2]},
        "t2": {"test_resnet": [0.2, 0.2], "test_convnext": [0.6, 0.6], "test_vit": [0.6, 0.6], "test_vit2": [0.9, 0.9]},
    }
    table = rank_table(_results(scores, {"t1": "accuracy", "t2": "accuracy"}), study="s",
                       task_metrics={"t1": ACCURACY, "t2": ACCURACY}, backbones=CATALOGUE)
    t1, t2 = table["tasks"]["t1"], table["tasks"]["t2"]
    assert t1["backbones"]["test_resnet"]["mean"] == pytest.approx(0.85)
    assert t1["backbones"]["test_resnet"]["std"] == pytest.approx(0.0707106781)
    assert [t1["backbones"][b]["rank"] for b in CATALOGUE] == [1, 3, 2, 4]
    assert [t2["backbones"][b]["rank"] for b in CATALOGUE] == [4, 2.5, 2.5, 1]
    assert t1["family_rank"] == {"convnet": 2.0, "transformer": 3.0}
    assert t2["family_rank"] == {"convnet": 3.25, "transformer": 1.75}
    assert table["backbones"]["test_convnext"]["average_rank"] == 2.75
    assert table["families"]["convnet"]["average_rank"] == pytest.approx((2.5 + 2.75) / 2)
    assert table["families"]["transformer"]["average_rank"] == pytest.approx((2.25 + 2.5) / 2)
    assert table["family_order"] == [["transformer"], ["convnet"]]
    assert table["backbones"]["test_vit"]["weights_label"] == "none (random init)"
    assert table["backbones"]["test_vit2"]["weights_label"] == "file:ckpt.pt (local checkpoint)"
    assert table["significance"]["applies"] is False
    assert "at least 3 tasks" in table["significance"]["reason"]


def test_friedman_nemenyi_with_three_or_more_tasks():
    scores = {f"t{i}": {"test_resnet": [0.9], "test_convnext": [0.7 + 0.01 * i], "test_vit": [0.5],
                        "test_vit2": [0.1]} for i in range(5)}
    table = rank_table(_results(scores, {t: "accuracy" for t in scores}), study="s",
                       task_metrics={t: ACCURACY for t in scores}, backbones=CATALOGUE)
    sig = table["significance"]
    assert sig["applies"] and sig["n_tasks"] == 5 and sig["n_backbones"] == 4
    assert sig["p_value"] < 0.05 and sig["significant"]
    # Demsar (2006) Table 5a: q_0.05 = 2.569 for k = 4
    assert sig["critical_difference"] == pytest.approx(2.569 * (4 * 5 / 30) ** 0.5, rel=1e-3)
    assert sig["pairwise_p"]["test_resnet"]["test_vit2"] < 0.05
    assert sig["pairwise_p"]["test_resnet"]["test_convnext"] > 0.05
    assert critical_difference(4, 5, 0.05) == sig["critical_difference"]


def test_reader_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "seed0.json"
    record = metrics_record("t", "test_vit", 0, "accuracy", 0.5)
    del record["val_accuracy"]
    path.write_text(json.dumps(record))
    with pytest.raises(ResultsError, match=r"seed0.json: missing required key 'val_accuracy'"):
        read_result(path)
    path.write_text(json.dumps({**record, "val_accuracy": 0.5, "seed": "0"}))
    with pytest.raises(ResultsError, match=r"key 'seed' must be int"):
        read_result(path)
    path.write_text(json.dumps({**record, "val_accuracy": 0.5}))
    with pytest.raises(ResultsError, match=r"key 'metric' is 'accuracy' but 'balanced_accuracy' was expected"):
        read_result(path, metric="balanced_accuracy")
    with pytest.raises(ResultsError, match=r"t/test_vit/full/seed1.json: metrics file not found"):
        read_study_results(tmp_path, evaluations={"t": EvaluationSpec("t", "full", "accuracy", (1,))},
                           backbones={"test_vit": "transformer"})


def test_compare_writes_md_csv_json_with_the_same_numbers(study):
    params = study({
        "covid": {"test_resnet": [0.6, 0.7, 0.65], "test_convnext": [0.5, 0.5, 0.5], "test_vit": [0.8, 0.7, 0.9],
                  "test_vit2": [0.5, 0.5, 0.5]},
        "synthetic": {"test_resnet": [0.3, 0.3, 0.3], "test_convnext": [0.9, 0.9, 0.8],
                      "test_vit": [0.5, 0.6, 0.5], "test_vit2": [0.2, 0.1, 0.2]},
    }, {"covid": "balanced_accuracy", "synthetic": "accuracy"})
    assert main(["--params", str(params), "compare"]) == 0
    reports = params.parent / "reports"
    table = json.loads((reports / "rank_table.json").read_text())
    rows = list(csv.DictReader((reports / "rank_table.csv").open()))
    markdown = (reports / "rank_table.md").read_text()
    for png in ("rank_heatmap.png", "rank_cd_diagram.png"):
        assert (reports / png).read_bytes()[:4] == b"\x89PNG"

    assert table["tasks"]["covid"]["backbones"]["test_convnext"]["rank"] == 3.5  # tie with test_vit2
    for row in rows:
        if row["scope"] == "task":
            cell = table["tasks"][row["task"]]["backbones"][row["backbone"]]
            assert float(row["mean"]) == cell["mean"] and float(row["rank"]) == cell["rank"]
            assert f"{cell['mean']:.4f} ± " in markdown
        elif row["scope"] == "task_family":
            assert float(row["rank"]) == table["tasks"][row["task"]]["family_rank"][row["family"]]
        elif row["scope"] == "average":
            assert float(row["rank"]) == table["backbones"][row["backbone"]]["average_rank"]
            assert f"**{float(row['rank']):.2f}**" in markdown
        elif row["scope"] == "family_average":
            assert float(row["rank"]) == table["families"][row["family"]]["average_rank"]
            assert f"**{float(row['rank']):.2f}**" in markdown
        elif row["scope"] == "group":
            assert float(row["rank"]) == table["groups"][row["group"]]["backbones"][row["backbone"]]
        else:
            assert row["scope"] == "group_family"
            assert float(row["rank"]) == table["groups"][row["group"]]["families"][row["family"]]
    # tasks x backbones, tasks x families, backbones, families; one group ("ungrouped"): backbones, families
    assert len(rows) == 2 * 4 + 2 * 2 + 4 + 2 + 4 + 2
    assert "none (random init)" in markdown and "**Weights: none (random init).**" in markdown
    assert "The Friedman test does not apply" in markdown and "2 task(s)" in markdown
    assert "| 80.0 |" in markdown and "n/a" in markdown  # ImageNet top-1 where known


def test_compare_fails_clearly_on_missing_results(study, capsys):
    params = study({"t": {"test_vit": [0.5, 0.6], "test_resnet": [0.4, 0.3]}})
    (params.parent / "metrics" / "t" / "test_vit" / "full" / "seed1.json").unlink()
    assert main(["--params", str(params), "compare"]) == 2
    assert "test_vit/full/seed1.json: metrics file not found" in capsys.readouterr().err
