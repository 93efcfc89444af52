"""Rank tables: per-task ranks (ties, direction), family averages, significance, and the report files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from study_files import assert_ranks_file, edit_json, metrics_record, multitask_record
from transferbench.cli import main
from transferbench.config import BackboneSettings
from transferbench.engine.run_files import read_run, records_dir, split_result, write_result
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.ranking import rank_scores, rank_table
from transferbench.evaluation.results import (
    EvaluationSpec,
    FinetuneResult,
    ResultsError,
    load_result,
    read_result,
    read_study_results,
    record_path,
    result_path,
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
    metrics_dir = tmp_path / "metrics"
    path = write_result(metrics_dir, metrics_record("t", "test_vit", 0, "accuracy", 0.5))
    record = record_path(metrics_dir, path)
    assert path == metrics_dir / "t/test_vit/full/seed0.json"
    assert record == tmp_path / "metrics.runs/t/test_vit/full/seed0.json"
    edit_json(path, lambda metrics: metrics.pop("val_accuracy"))  # the scores are the metrics file's
    with pytest.raises(ResultsError, match=r"seed0.json: missing required key 'val_accuracy'"):
        read_result(path, record)
    edit_json(path, lambda metrics: metrics.update(val_accuracy=0.5))
    edit_json(record, lambda raw: raw.update(seed="0"))  # who made them: the record's
    with pytest.raises(ResultsError, match=r"seed0.json: key 'seed' must be int"):
        read_result(path, record)
    edit_json(record, lambda raw: raw.update(seed=0))
    assert read_result(path, record).val_score == 0.5
    with pytest.raises(ResultsError, match=r"key 'metric' is 'accuracy' but 'balanced_accuracy' was expected"):
        read_result(path, record, metric="balanced_accuracy")
    with pytest.raises(ResultsError, match=r"t/test_vit/full/seed1.json: metrics file not found"):
        read_study_results(metrics_dir, evaluations={"t": EvaluationSpec("t", "full", "accuracy", (1,))},
                           backbones={"test_vit": "transformer"})


# --------------------------------------------------------------------------- a run's two files
MULTITASK = multitask_record("mt", "test_vit", 1, [
    {"task": "seg", "kind": "segmentation", "metric": "miou", "higher_is_better": True, "val_score": 0.41,
     "test_score": 0.39, "baseline": "majority class", "baseline_score": 0.25},
    {"task": "depth", "kind": "depth", "metric": "rmse", "higher_is_better": False, "val_score": 1.1,
     "test_score": 1.2}], val_loss=0.7, test_routing_accuracy=None, stop_reason="patience", lr=1e-3)
RETRIEVAL = {  # what the retrieve stage writes (stages/retrieve.py)
    "task": "oxford", "task_kind": "retrieval", "mode": "frozen", "backbone": "test_resnet", "model": "test_resnet",
    "family": "convnet", "weights": "none", "weights_label": "random-init", "random_init": True, "seed": 0,
    "study": "s", "n_note": "deterministic: no seeds, n = 1", "img_size": 64, "resize": [64, 64], "query": "crop",
    "metric": "map", "val_score": None, "test_score": 0.31, "test_map": 0.31, "baseline": "random ranking",
    "baseline_score": 0.05, "n_queries": 2, "n_database": 10, "test_ap": {"q_1": 0.5, "q_2": 0.12},
    "seconds": 1.5, "mlflow_run_id": "a" * 32, "data_version": "md5:abc", "feature_cache_key": "k" * 64,
    "git_commit": "deadbeef"}
RESULTS = {"single": metrics_record("t:linear_probe", "test_vit", 2, "accuracy", 0.5, 0.6, val_score=0.6,
                                    test_score=0.5, baseline="majority class", baseline_score=0.33, best_val_loss=0.4,
                                    train_seconds=12.5, val_loss=None, stop_reason="max_epochs"),
           "multitask": MULTITASK, "retrieval": RETRIEVAL}


def _is_number(value: object) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.parametrize("kind", list(RESULTS))
def test_a_result_splits_into_numbers_and_a_record_and_reads_back_whole(tmp_path: Path, kind: str):
    result = RESULTS[kind]
    metrics, record = split_result(result)
    # the metrics part: only numbers (null: no score), a multitask run's per component task
    assert all(_is_number(v) for k, v in metrics.items() if k != "components")
    for scores in metrics.get("components", {}).values():
        assert scores and all(_is_number(v) for v in scores.values())
    assert metrics["test_score"] == result["test_score"] and "val_score" in metrics
    assert not set(metrics) & set(record) - {"components"}
    assert {"task", "mode", "backbone", "family", "seed", "metric", "mlflow_run_id"} <= set(record)
    if kind == "retrieval":
        assert metrics["val_score"] is None and record["test_ap"] == result["test_ap"] and "test_ap" not in metrics
    if kind == "multitask":
        assert metrics["components"] == {"seg": {"val_score": 0.41, "test_score": 0.39, "baseline_score": 0.25},
                                         "depth": {"val_score": 1.1, "test_score": 1.2}}
        assert [e["task"] for e in record["components"]] == ["seg", "depth"]
        assert record["components"][0]["baseline"] == "majority class"

    path = write_result(tmp_path / "metrics", result)
    assert path == result_path(tmp_path / "metrics", result["task"], result["backbone"], result["seed"], result["mode"])
    assert json.loads(path.read_text()) == metrics
    assert json.loads(record_path(tmp_path / "metrics", path).read_text()) == record
    assert load_result(path, record_path(tmp_path / "metrics", path)) == result
    assert read_run(tmp_path / "metrics", result["task"], result["backbone"], result["seed"], result["mode"]) == result


def test_a_run_without_its_record_is_an_error_naming_the_record(tmp_path: Path, study, capsys):
    path = write_result(tmp_path / "m", metrics_record("t", "test_vit", 0, "accuracy", 0.5))
    record = record_path(tmp_path / "m", path)
    record.unlink()
    with pytest.raises(ResultsError, match=rf"^{re.escape(str(record))}: run record .* not found"):
        read_result(path, record)

    params = study({"t": {"test_vit": [0.5, 0.6], "test_resnet": [0.4, 0.3]}})
    missing = records_dir(params.parent / "metrics") / "t" / "test_resnet" / "full" / "seed1.json"
    missing.unlink()
    assert main(["--params", str(params), "compare"]) == 2
    assert f"{missing}: run record (written with the metrics file) not found" in capsys.readouterr().err


def test_a_key_in_both_files_is_an_error_naming_both(tmp_path: Path):
    path = write_result(tmp_path / "m", metrics_record("t", "test_vit", 0, "accuracy", 0.5))
    record = record_path(tmp_path / "m", path)
    edit_json(record, lambda raw: raw.update(test_accuracy=0.9))  # a stale or hand-edited record
    with pytest.raises(ResultsError, match=rf"^{re.escape(str(path))}: keys \['test_accuracy'\] are also in its "
                                           rf"record {re.escape(str(record))}$"):
        read_result(path, record)
    with pytest.raises(ResultsError, match=r"keys \['test_accuracy'\]"):
        load_result(path, record)


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
    # the numbers `dvc metrics show` prints: the table's average ranks, in compare.ranks_file
    ranks = assert_ranks_file(params)
    assert ranks == json.loads((params.parent / "ranks.json").read_text())
    assert ranks["average_rank"]["families"] == {f: table["families"][f]["average_rank"]
                                                 for f in ("convnet", "transformer")}
    assert ranks["n_evaluations"] == 2 and ranks["friedman_p_value"] is None  # 2 tasks: the test does not apply
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
