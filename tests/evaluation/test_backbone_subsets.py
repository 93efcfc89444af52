"""Evaluations run on a subset of the study's backbones (``tasks.<task>.backbones``, issue #22).

Ranks within the backbones an evaluation ran, averages over the evaluations each backbone ran, the
Friedman/Nemenyi test restricted to the evaluations that ran every backbone, the drift gate comparing two
such tables and the learning floors judging only the families present. Expected values are worked out by
hand in each test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study_files import metrics_record
from transferbench.config import BackboneSettings
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.drift import check_learning_floors, compare_rank_tables, has_drift, validate_rank_table
from transferbench.evaluation.ranking import rank_table
from transferbench.evaluation.results import FinetuneResult

ACCURACY = MetricSpec("accuracy")
RESNET, CONVNEXT, VIT, VIT2 = "test_resnet", "test_convnext", "test_vit", "test_vit2"
CATALOGUE = {
    RESNET: BackboneSettings(model=RESNET, family="convnet", weights="none"),
    CONVNEXT: BackboneSettings(model=CONVNEXT, family="convnet", weights="none"),
    VIT: BackboneSettings(model=VIT, family="transformer", weights="none"),
    VIT2: BackboneSettings(model=VIT2, family="transformer", weights="none"),
}
# t1..t3 run every backbone; "sub" runs resnet and vit only.
SCORES = {
    "t1": {RESNET: 0.9, CONVNEXT: 0.7, VIT: 0.5, VIT2: 0.1},   # ranks 1 2 3 4
    "t2": {RESNET: 0.8, CONVNEXT: 0.71, VIT: 0.5, VIT2: 0.1},  # ranks 1 2 3 4
    "t3": {RESNET: 0.5, CONVNEXT: 0.9, VIT: 0.7, VIT2: 0.1},   # ranks 3 1 2 4
    "sub": {RESNET: 0.4, VIT: 0.6},                            # ranks 2 . 1 .
}
SUBSET = {"sub": [RESNET, VIT]}


def _results(scores: dict[str, dict[str, float]], baseline: dict[str, float] | None = None) -> list[FinetuneResult]:
    out = []
    for task, per_backbone in scores.items():
        for backbone, value in per_backbone.items():
            extra = {} if task not in (baseline or {}) else {"baseline": "majority class",
                                                             "baseline_score": baseline[task]}
            raw = metrics_record(task, backbone, 0, "accuracy", value, **extra)
            out.append(FinetuneResult(Path("x.json"), task, "full", backbone, raw["family"], "none", 0, "0" * 32,
                                      "accuracy", value, value, raw))
    return out


def _table(scores: dict[str, dict[str, float]] = SCORES, subset: dict[str, list[str]] = SUBSET, **kwargs) -> dict:
    table = rank_table(_results(scores, **kwargs), study="s", task_metrics={t: ACCURACY for t in scores},
                       backbones=CATALOGUE, evaluation_backbones=subset)
    return validate_rank_table(json.loads(json.dumps(table)), "table")  # what compare writes and the gate reads


def test_an_evaluation_ranks_the_backbones_it_ran_and_averages_cover_what_each_backbone_ran():
    table = _table()
    sub = table["tasks"]["sub"]
    assert {b: c["rank"] for b, c in sub["backbones"].items()} == {RESNET: 2.0, VIT: 1.0}
    assert sub["all_backbones"] is False and table["tasks"]["t1"]["all_backbones"] is True
    assert sub["family_rank"] == {"convnet": 2.0, "transformer": 1.0}
    # resnet (1 + 1 + 3 + 2) / 4, convnext (2 + 2 + 1) / 3, vit (3 + 3 + 2 + 1) / 4, vit2 (4 + 4 + 4) / 3
    average = {b: x["average_rank"] for b, x in table["backbones"].items()}
    assert average == pytest.approx({RESNET: 1.75, CONVNEXT: 5 / 3, VIT: 2.25, VIT2: 4.0})
    assert table["families"]["convnet"]["average_rank"] == pytest.approx((1.75 + 5 / 3) / 2)
    assert table["families"]["transformer"]["average_rank"] == pytest.approx((2.25 + 4.0) / 2)
    assert table["family_order"] == [["convnet"], ["transformer"]]
    assert "over the evaluations it ran" in table["ranking"]["subsets"]


def test_groups_average_over_the_group_evaluations_each_backbone_ran():
    groups = {"t1": "scene", "t2": "scene", "t3": "scene", "sub": "face"}
    table = rank_table(_results(SCORES), study="s", task_metrics={t: ACCURACY for t in SCORES}, backbones=CATALOGUE,
                       evaluation_backbones=SUBSET, groups=groups)
    assert table["groups"]["face"]["backbones"] == {RESNET: 2.0, CONVNEXT: None, VIT: 1.0, VIT2: None}
    assert table["groups"]["face"]["families"] == {"convnet": 2.0, "transformer": 1.0}
    assert table["groups"]["scene"]["backbones"][RESNET] == pytest.approx(5 / 3)


def test_friedman_runs_over_the_evaluations_that_ran_every_backbone_and_names_the_others():
    sig = _table()["significance"]
    assert sig["evaluations"] == ["t1", "t2", "t3"] and sig["n_tasks"] == 3 and sig["n_backbones"] == 4
    assert sig["left_out"] == {"sub": "ran 2 of the study's 4 backbones"}
    complete = {t: s for t, s in SCORES.items() if t != "sub"}
    alone = rank_table(_results(complete), study="s", task_metrics={t: ACCURACY for t in complete},
                       backbones=CATALOGUE)["significance"]
    assert sig["applies"] and alone["applies"] and sig["statistic"] == alone["statistic"]
    assert sig["critical_difference"] == alone["critical_difference"]
    # the CD diagram's average ranks: over t1..t3 only
    assert sig["average_ranks"] == pytest.approx({RESNET: 5 / 3, CONVNEXT: 5 / 3, VIT: 8 / 3, VIT2: 4.0})


@pytest.mark.parametrize("tasks", [["t1", "sub"], ["sub"]])
def test_friedman_is_skipped_cleanly_with_too_few_complete_evaluations(tasks):
    sig = _table({t: SCORES[t] for t in tasks})["significance"]
    assert sig["applies"] is False and sig["n_tasks"] == len(tasks) - 1
    assert sig["left_out"] == {"sub": "ran 2 of the study's 4 backbones"}
    assert "at least 3 tasks" in sig["reason"]


def test_rank_table_refuses_a_declared_backbone_without_results_or_outside_the_study():
    with pytest.raises(ValueError, match=r"task 'sub': no results for backbones \['test_convnext'\]"):
        _table(subset={"sub": [RESNET, CONVNEXT, VIT]})
    with pytest.raises(ValueError, match=r"task 'sub': runs on \['resnet50'\]"):
        _table(subset={"sub": ["resnet50"]})


def test_the_drift_gate_compares_two_tables_with_a_subset_evaluation():
    old = _table()
    assert compare_rank_tables(old, _table(), tolerance=0.05) == []

    # vit falls below resnet on "sub": a rank swap there (and a metric move) is drift
    moved = {**SCORES, "sub": {RESNET: 0.4, VIT: 0.3}}
    changes = compare_rank_tables(old, _table(moved), tolerance=0.05)
    assert {(c.kind, c.task, c.subject, c.before, c.after) for c in changes if c.kind == "rank"} == {
        ("rank", "sub", RESNET, "2", "1"), ("rank", "sub", VIT, "1", "2")}
    assert has_drift(changes)

    # "sub" now also runs convnext: a backbone added to that evaluation is structural drift
    wider = {**SCORES, "sub": {RESNET: 0.4, CONVNEXT: 0.1, VIT: 0.6}}
    changes = compare_rank_tables(old, _table(wider, subset={"sub": [RESNET, CONVNEXT, VIT]}), tolerance=0.05)
    assert [(c.kind, c.task, c.subject, c.before, c.after) for c in changes if c.kind == "structure"] == [
        ("structure", "sub", CONVNEXT, "absent", "present")]


def test_the_trivial_floor_judges_each_family_present_on_a_subset_evaluation():
    table = _table(baseline={"sub": 0.5})
    assert table["tasks"]["sub"]["trivial_baseline"] == 0.5
    checks = check_learning_floors(table, {"sub": "trivial"})
    # convnet's only backbone there (resnet, 0.4) does not beat 0.5; transformer's (vit, 0.6) does
    assert [(c.task, c.subject, c.drift) for c in checks] == [("sub", "convnet", True), ("sub", "transformer", False)]
    assert "the best convnet backbone (test_resnet) scores 0.4000 accuracy, not > 0.5" in checks[0].why


def test_a_floor_on_a_multitask_task_applies_to_its_components_where_a_trivial_baseline_is_recorded():
    cell = {"std": None, "n_seeds": 1, "rank": 1.0}
    table = {"backbones": {RESNET: {"family": "convnet"}, VIT: {"family": "transformer"}},
             "tasks": {"mt/seg": {"task": "mt", "component": "seg", "metric": "miou", "higher_is_better": True,
                                  "trivial_baseline": 0.25,
                                  "backbones": {RESNET: {**cell, "mean": 0.2}, VIT: {**cell, "mean": 0.3}}},
                       "mt/depth": {"task": "mt", "component": "depth", "metric": "rmse", "higher_is_better": False,
                                    "trivial_baseline": None, "backbones": {RESNET: {**cell, "mean": 1.0}}}}}
    checks = check_learning_floors(table, {"mt": "trivial"})
    assert [(c.task, c.subject, c.drift) for c in checks] == [
        ("mt/seg", "convnet", True), ("mt/seg", "transformer", False), ("mt/depth", "(no family)", False)]
    assert "records no trivial baseline, so the trivial floor does not apply" in checks[2].why
    # a task kind without a trivial baseline still fails a "trivial" floor outside multi-task
    table["tasks"]["age"] = {**table["tasks"]["mt/depth"], "task": "age", "component": None}
    (check,) = check_learning_floors(table, {"age": "trivial"})
    assert check.drift and "records no trivial baseline to beat" in check.why
