"""Multi-task results (issue #22; paper Tables 9-13): per-component columns, relative change, reports, gate.

Hand-made results (metrics files and records) in the finetune stage's contract (``study_files.multitask_record``)
and hand-picked scores; every expected number is worked out by hand here. The components stand in for the dense
kinds with the existing ones (classification accuracy, higher is better; age MAE, lower is better) or with MetricSpec
objects built directly, so these tests do not depend on the dense kinds' code.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from study_files import assert_ranks_file, edit_json, edit_result, metrics_record, multitask_record, write_params
from transferbench.cli import main
from transferbench.config import BackboneSettings, load_settings
from transferbench.engine.run_files import record_path, write_result
from transferbench.engine.tasks import MetricSpec, list_task_kinds
from transferbench.evaluation.multitask import relative_change
from transferbench.evaluation.ranking import rank_table
from transferbench.evaluation.results import (
    EvaluationSpec,
    FinetuneResult,
    ResultsError,
    read_result,
    read_study_results,
)
from transferbench.evaluation.study import evaluation_group, evaluations, registered_evaluations, task_metrics

RESNET, CONVNEXT, VIT, VIT2 = "test_resnet", "test_convnext", "test_vit", "test_vit2"


def _component(task: str, metric: str, test: float, val: float | None = None, higher: bool = True) -> dict:
    return {"task": task, "kind": "classification" if metric == "accuracy" else "age", "metric": metric,
            "higher_is_better": higher, "val_score": test if val is None else val, "test_score": test}


# --------------------------------------------------------------------------- relative change by hand
@pytest.mark.parametrize("multi, single, higher, expected", [
    (0.55, 0.50, True, 10.0),     # accuracy 0.50 -> 0.55: +10 %
    (0.45, 0.50, True, -10.0),    # worse accuracy: negative
    (1.5, 2.0, False, 25.0),      # rmse 2.0 -> 1.5: lower is better, so +25 %
    (2.5, 2.0, False, -25.0),     # worse rmse: negative
    (-0.3, -0.2, True, -50.0),    # a negative single-task score: divided by |single|
])
def test_relative_change_is_positive_when_the_multi_task_model_is_better(multi, single, higher, expected):
    assert relative_change(multi, single, higher_is_better=higher) == pytest.approx(expected)


def test_relative_change_over_a_zero_single_task_score_is_undefined():
    assert relative_change(0.3, 0.0, higher_is_better=True) is None
    assert relative_change(0.3, 0.0, higher_is_better=False) is None


# --------------------------------------------------------------------------- the multi-task table
MIOU, RMSE = MetricSpec("miou"), MetricSpec("rmse", higher_is_better=False)
TWO = {RESNET: BackboneSettings(model=RESNET, family="convnet", weights="none"),
       VIT: BackboneSettings(model=VIT, family="transformer", weights="none")}


def _single(task: str, metric: str, backbone: str, seed: int, score: float) -> FinetuneResult:
    raw = metrics_record(task, backbone, seed, metric, score)
    return FinetuneResult(Path(f"{task}.json"), task, "full", backbone, raw["family"], "none", seed, "0" * 32, metric,
                          score, score, raw)


def _multi(backbone: str, seed: int, seg: float, rmse: float, routing: float | None = None) -> list[FinetuneResult]:
    """The two component results of one multitask run (seg: miou, depth: rmse)."""
    entries = [_component("seg", "miou", seg), _component("depth", "rmse", rmse, higher=False)]
    raw = multitask_record("mt", backbone, seed, entries,
                           **({} if routing is None else {"test_routing_accuracy": routing}))
    return [FinetuneResult(Path("mt.json"), "mt", "full", backbone, raw["family"], "none", seed, "0" * 32,
                           e["metric"], e["val_score"], e["test_score"], raw, component=e["task"]) for e in entries]


def test_multi_task_table_pairs_by_seed_and_counts_unpaired_and_undefined_seeds():
    results = [
        # single-task seg: resnet scores 0 on seed 2 (relative change undefined there)
        *(_single("seg", "miou", RESNET, s, v) for s, v in enumerate([0.50, 0.40, 0.0])),
        *(_single("seg", "miou", VIT, s, v) for s, v in enumerate([0.60, 0.60, 0.60])),
        # single-task depth: vit has no seed 2 (unpaired)
        *(_single("depth", "rmse", RESNET, s, v) for s, v in enumerate([2.0, 2.0, 2.0])),
        *(_single("depth", "rmse", VIT, s, v) for s, v in enumerate([2.0, 4.0])),
        *_multi(RESNET, 0, 0.55, 1.5, routing=0.9), *_multi(RESNET, 1, 0.44, 1.5, routing=1.0),
        *_multi(RESNET, 2, 0.10, 1.5, routing=0.8),
        *_multi(VIT, 0, 0.66, 1.5), *_multi(VIT, 1, 0.54, 5.0), *_multi(VIT, 2, 0.60, 3.0),
    ]
    metrics = {"seg": MIOU, "depth": RMSE, "mt/seg": MIOU, "mt/depth": RMSE}
    table = rank_table(results, study="s", task_metrics=metrics, backbones=TWO,
                       groups={"mt/seg": "multi-task", "mt/depth": "multi-task"})
    assert table["tasks"]["mt/seg"]["task"] == "mt" and table["tasks"]["mt/seg"]["component"] == "seg"
    multi = table["multi_task"]["mt"]
    assert list(multi["components"]) == ["seg", "depth"]

    seg = multi["components"]["seg"]
    assert seg["evaluation"] == "mt/seg" and seg["metric"] == "miou" and seg["higher_is_better"] is True
    resnet = seg["backbones"][RESNET]
    # performance: mean of 0.55, 0.44, 0.10
    assert resnet["performance"]["mean"] == pytest.approx(1.09 / 3) and resnet["performance"]["n_seeds"] == 3
    # seed 0: 100 * (0.55 - 0.50) / 0.50 = +10; seed 1: 100 * (0.44 - 0.40) / 0.40 = +10; seed 2: single 0
    assert resnet["relative_change"]["mean"] == pytest.approx(10.0)
    assert resnet["relative_change"]["n_seeds"] == 2 and resnet["relative_change"]["std"] == pytest.approx(0.0)
    assert resnet["unpaired_seeds"] == 0 and "single-task score 0 on seed(s) 2" in resnet["note"]
    vit = seg["backbones"][VIT]  # +10, -10, 0
    assert vit["relative_change"]["mean"] == pytest.approx(0.0)
    assert vit["relative_change"]["std"] == pytest.approx(10.0) and vit["note"] is None
    # rank by performance: resnet 0.3633 < vit 0.60
    assert (resnet["rank"], vit["rank"]) == (2.0, 1.0)
    assert seg["families"]["convnet"] == pytest.approx({"mean": 10.0, "std": 0.0, "n": 2})
    assert seg["families"]["transformer"]["mean"] == pytest.approx(0.0) and seg["families"]["transformer"]["n"] == 3

    depth = multi["components"]["depth"]
    # lower is better: 100 * (single - multi) / |single|; resnet 2.0 -> 1.5 on every seed: +25
    assert depth["backbones"][RESNET]["relative_change"]["mean"] == pytest.approx(25.0)
    vit = depth["backbones"][VIT]  # seed 0: 2.0 -> 1.5 = +25; seed 1: 4.0 -> 5.0 = -25; seed 2 has no single run
    assert vit["relative_change"]["mean"] == pytest.approx(0.0) and vit["relative_change"]["n_seeds"] == 2
    assert vit["unpaired_seeds"] == 1 and "no single-task depth result of test_vit for seed(s) 2" in vit["note"]
    assert vit["single_task"]["mean"] == pytest.approx(3.0) and vit["single_task"]["n_seeds"] == 2
    # rank: resnet rmse 1.5 beats vit's 3.1667
    assert (depth["backbones"][RESNET]["rank"], vit["rank"]) == (1.0, 2.0)

    # routing accuracy where the runs record it
    assert multi["routing_accuracy"] == {RESNET: pytest.approx({"mean": 0.9, "std": 0.1, "n_seeds": 3})}
    # the multitask components are not linear-probe gains
    assert table["gain_from_full_finetuning"] == {}


def test_multi_task_relative_change_is_null_when_every_single_task_score_is_zero():
    results = [_single("seg", "miou", b, 0, 0.0) for b in TWO] + [_single("depth", "rmse", b, 0, 2.0) for b in TWO]
    results += [*_multi(RESNET, 0, 0.3, 1.0), *_multi(VIT, 0, 0.2, 1.0)]
    table = rank_table(results, study="s", task_metrics={"seg": MIOU, "depth": RMSE, "mt/seg": MIOU,
                                                         "mt/depth": RMSE}, backbones=TWO)
    cell = table["multi_task"]["mt"]["components"]["seg"]["backbones"][RESNET]
    assert cell["relative_change"] is None and cell["unpaired_seeds"] == 0
    assert cell["note"] == "single-task score 0 on seed(s) 0: relative change undefined there"
    assert table["multi_task"]["mt"]["components"]["seg"]["families"] == {}
    assert table["multi_task"]["mt"]["routing_accuracy"] is None


# --------------------------------------------------------------------------- reading a multitask JSON
def test_a_multitask_json_reads_into_one_result_per_component(tmp_path: Path):
    metrics_dir = tmp_path / "metrics"
    record = multitask_record("mt", VIT, 0, [_component("seg", "miou", 0.39, val=0.41),
                                             _component("depth", "rmse", 1.2, val=1.1, higher=False)],
                              val_loss=0.7, test_routing_accuracy=0.95)
    path = write_result(metrics_dir, record)
    assert path == metrics_dir / "mt" / VIT / "full" / "seed0.json"
    run = record_path(metrics_dir, path)
    # the metrics file: per component task its scores; the record: the components' identities, in order
    assert json.loads(path.read_text())["components"] == {
        "seg": {"val_score": 0.41, "test_score": 0.39}, "depth": {"val_score": 1.1, "test_score": 1.2}}
    assert [e["task"] for e in json.loads(run.read_text())["components"]] == ["seg", "depth"]
    assert "test_score" not in json.loads(run.read_text())["components"][0]

    seg = read_result(path, run, task="mt", backbone=VIT, seed=0, metric="miou", mode="full", component="seg")
    assert (seg.task, seg.component, seg.evaluation, seg.metric) == ("mt", "seg", "mt/seg", "miou")
    assert (seg.val_score, seg.test_score) == (0.41, 0.39)
    assert seg.raw == record and seg.trivial_baseline is None
    whole = read_result(path, run, metric="loss")  # the multitask model itself (what the registry reads)
    assert (whole.component, whole.evaluation, whole.val_score) == (None, "mt", 0.7)
    assert whole.test_score == pytest.approx(0.8)

    specs = {"mt/depth": EvaluationSpec("mt", "full", "rmse", (0,), backbones=(VIT,), component="depth")}
    (depth,) = read_study_results(metrics_dir, evaluations=specs, backbones={RESNET: "convnet", VIT: "transformer"})
    assert (depth.backbone, depth.evaluation, depth.test_score) == (VIT, "mt/depth", 1.2)

    with pytest.raises(ResultsError, match=r"seed0.json: key 'components\[0\].metric' is 'miou' but 'iou' was"):
        read_result(path, run, metric="iou", component="seg")
    with pytest.raises(ResultsError, match=r"seed0.json: key 'components' has no entry for task 'normals'"):
        read_result(path, run, component="normals")
    edit_json(path, lambda metrics: metrics["components"]["depth"].pop("test_score"))
    with pytest.raises(ResultsError, match=r"seed0.json: missing required key 'components\[1\].test_score'"):
        read_result(path, run, component="depth")
    edit_json(path, lambda metrics: metrics["components"]["seg"].update(val_score="0.4"))
    with pytest.raises(ResultsError, match=r"seed0.json: key 'components\[0\].val_score' must be int or float"):
        read_result(path, run, component="seg")
    # a record that does not list the components the metrics file scores
    edit_json(run, lambda raw: raw.pop("components"))
    with pytest.raises(ResultsError, match=r"seed0.json: key 'components' must be an object .* its record "
                                           rf"{re.escape(str(run))} must list the components"):
        read_result(path, run, component="seg")
    edit_json(path, lambda metrics: metrics.pop("components"))
    with pytest.raises(ResultsError, match=r"seed0.json: missing required key 'components'"):
        read_result(path, run, component="seg")


def test_a_component_with_its_own_trivial_baseline_carries_it_into_the_table():
    entries = [{**_component("seg", "miou", 0.4), "baseline": "majority class", "baseline_score": 0.25},
               _component("depth", "rmse", 1.0, higher=False)]
    raw = multitask_record("mt", VIT, 0, entries)
    (seg, depth) = [FinetuneResult(Path("mt.json"), "mt", "full", VIT, "transformer", "none", 0, "0" * 32,
                                   e["metric"], e["val_score"], e["test_score"], raw, component=e["task"])
                    for e in entries]
    assert seg.trivial_baseline == ("majority class", 0.25) and depth.trivial_baseline is None


# --------------------------------------------------------------------------- the study end to end
SINGLE = {
    "cls": {RESNET: [0.50, 0.60], CONVNEXT: [0.70, 0.70], VIT: [0.40, 0.80], VIT2: [0.30, 0.30]},
    "age": {RESNET: [2.0, 4.0], CONVNEXT: [3.5, 3.5], VIT2: [6.0, 6.0]},  # age runs on 3 of the 4 backbones
}
# multitask "mt" = cls + age, on resnet and vit: (cls accuracy, age MAE, routing accuracy) per seed
MULTI = {RESNET: [(0.55, 1.5, 0.9), (0.66, 5.0, 1.0)], VIT: [(0.44, 4.0, 0.8), (0.72, 4.0, 0.8)]}


def _write_study(root: Path, **params) -> Path:
    metrics_dir = root / "metrics"
    for task, per_backbone in SINGLE.items():
        metric = "accuracy" if task == "cls" else "mae"
        for backbone, values in per_backbone.items():
            for seed, value in enumerate(values):
                write_result(metrics_dir, metrics_record(task, backbone, seed, metric, value))
    for backbone, runs in MULTI.items():
        for seed, (cls, age, routing) in enumerate(runs):
            entries = [_component("cls", "accuracy", cls), _component("age", "mae", age, higher=False)]
            write_result(metrics_dir, multitask_record("mt", backbone, seed, entries, test_routing_accuracy=routing))
    return write_params(root, tasks={"cls": "accuracy", "age": "mae"}, backbones=[RESNET, CONVNEXT, VIT, VIT2],
                        seeds=[0, 1], task_backbones={"age": [RESNET, CONVNEXT, VIT2], "mt": [RESNET, VIT]},
                        multitask={"mt": ["cls", "age"]}, **params)


def test_study_evaluations_put_multitask_components_last_and_register_the_model_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(_write_study(tmp_path))
    specs = evaluations(settings)
    assert list(specs) == ["cls", "age", "mt/cls", "mt/age"]
    assert specs["mt/age"] == EvaluationSpec("mt", "full", "mae", (0, 1), backbones=(RESNET, VIT), component="age")
    assert specs["age"].backbones == (RESNET, CONVNEXT, VIT2)
    assert [evaluation_group(settings, s) for s in specs.values()][2:] == ["multi-task", "multi-task"]
    assert task_metrics(settings)["mt/age"] == MetricSpec("mae", higher_is_better=False)
    assert task_metrics(settings)["mt/cls"] == MetricSpec("accuracy")
    registered = registered_evaluations(settings)
    assert list(registered) == ["cls", "age", "mt"]
    assert registered["mt"] == EvaluationSpec("mt", "full", "loss", (0, 1), backbones=(RESNET, VIT))


@pytest.mark.skipif("multitask" not in list_task_kinds(), reason="the multitask task kind has not landed yet")
def test_the_registry_selects_a_multitask_model_by_its_summed_val_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(_write_study(tmp_path))
    metrics = task_metrics(settings, registered_evaluations(settings))
    assert metrics["mt"] == MetricSpec("loss", higher_is_better=False)
    assert metrics["age"] == MetricSpec("mae", higher_is_better=False)


def test_compare_ranks_components_and_writes_the_multi_task_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = _write_study(tmp_path, floors={"mt": "trivial"})
    assert main(["--params", str(params), "compare"]) == 0
    reports = tmp_path / "reports"
    table = json.loads((reports / "rank_table.json").read_text())
    assert assert_ranks_file(params)["average_rank"]["families"] == {"convnet": 1.5, "transformer": 2.75}
    tasks = table["tasks"]
    assert list(tasks) == ["cls", "age", "mt/cls", "mt/age"]
    assert tasks["mt/age"]["group"] == "multi-task" and tasks["mt/age"]["higher_is_better"] is False
    # mt/cls: resnet 0.605 > vit 0.58; mt/age (MAE): resnet 3.25 < vit 4.0; only the two backbones it ran
    assert {b: c["rank"] for b, c in tasks["mt/cls"]["backbones"].items()} == {RESNET: 1.0, VIT: 2.0}
    assert {b: c["rank"] for b, c in tasks["mt/age"]["backbones"].items()} == {RESNET: 1.0, VIT: 2.0}
    # age: resnet 3.0, convnext 3.5, vit2 6.0
    assert {b: c["rank"] for b, c in tasks["age"]["backbones"].items()} == {RESNET: 1, CONVNEXT: 2, VIT2: 3}
    # cls: convnext 0.7, vit 0.6, resnet 0.55, vit2 0.3. Averages over the evaluations each backbone ran:
    # resnet (3 + 1 + 1 + 1) / 4, convnext (1 + 2) / 2, vit (2 + 2 + 2) / 3, vit2 (4 + 3) / 2
    assert {b: x["average_rank"] for b, x in table["backbones"].items()} == {
        RESNET: 1.5, CONVNEXT: 1.5, VIT: 2.0, VIT2: 3.5}
    assert table["families"]["convnet"]["average_rank"] == 1.5
    assert table["families"]["transformer"]["average_rank"] == 2.75
    assert table["groups"]["multi-task"]["backbones"] == {RESNET: 1.0, CONVNEXT: None, VIT: 2.0, VIT2: None}
    sig = table["significance"]
    assert sig["applies"] is False and sig["evaluations"] == ["cls"]
    assert sig["left_out"] == {"age": "ran 3 of the study's 4 backbones", "mt/cls": "ran 2 of the study's 4 backbones",
                               "mt/age": "ran 2 of the study's 4 backbones"}

    mt = table["multi_task"]["mt"]
    cls, age = mt["components"]["cls"], mt["components"]["age"]
    # cls: resnet 0.50 -> 0.55, 0.60 -> 0.66: +10, +10; vit 0.40 -> 0.44, 0.80 -> 0.72: +10, -10
    assert cls["backbones"][RESNET]["relative_change"]["mean"] == pytest.approx(10.0)
    assert cls["backbones"][VIT]["relative_change"]["mean"] == pytest.approx(0.0)
    assert cls["backbones"][VIT]["relative_change"]["std"] == pytest.approx(200 ** 0.5)
    assert cls["families"]["convnet"]["mean"] == pytest.approx(10.0)
    # age (lower is better): resnet 2.0 -> 1.5 = +25, 4.0 -> 5.0 = -25; vit has no single-task age run at all
    assert age["backbones"][RESNET]["relative_change"]["mean"] == pytest.approx(0.0)
    assert age["backbones"][RESNET]["relative_change"]["std"] == pytest.approx(1250 ** 0.5)
    assert age["backbones"][VIT]["relative_change"] is None and age["backbones"][VIT]["unpaired_seeds"] == 2
    assert "transformer" not in age["families"]
    assert mt["routing_accuracy"][RESNET]["mean"] == pytest.approx(0.95)
    assert mt["routing_accuracy"][VIT]["mean"] == pytest.approx(0.8)

    markdown = (reports / "rank_table.md").read_text()
    assert "## Multi-task (paper Tables 9–13)" in markdown and "### `mt`" in markdown
    assert "| `test_resnet` | convnet | 0.6050 ± 0.0778 | +10.00 ± 0.00 | 1 | 3.2500 ± 2.4749 | +0.00 ± 35.36 | 1 | " \
           "0.9500 ± 0.0707 |" in markdown
    assert "| `test_vit` | transformer | 0.5800 ± 0.1980 | +0.00 ± 14.14 | 2 | 4.0000 ± 0.0000 | n/a | 2 |" in markdown
    assert "no single-task age result of test_vit for seed(s) 0, 1" in markdown
    assert "Left out of the test, which needs every backbone on every evaluation: `age` (ran 3" in markdown
    (vit_row,) = [line for line in markdown.splitlines() if line.startswith("| `test_vit` | transformer | none")]
    assert "| — |" in vit_row  # vit does not run age
    rows = list(csv.DictReader((reports / "rank_table.csv").open()))
    changes = {(r["task"], r["backbone"]): float(r["mean"]) for r in rows
               if r["scope"] == "multi_task_relative_change_pct"}
    assert changes == pytest.approx({("mt/cls", RESNET): 10.0, ("mt/cls", VIT): 0.0, ("mt/age", RESNET): 0.0})
    assert {(r["task"], r["backbone"]) for r in rows if r["scope"] == "task"} >= {("mt/age", VIT), ("mt/cls", RESNET)}
    assert ("age", VIT) not in {(r["task"], r["backbone"]) for r in rows if r["scope"] == "task"}
    for png in ("rank_heatmap.png", "rank_cd_diagram.png"):
        assert (reports / png).read_bytes()[:4] == b"\x89PNG"

    # the gate: unchanged passes (the trivial floor on mt does not apply: no component records a baseline)
    (tmp_path / "baseline.json").write_text(json.dumps(table))
    capsys.readouterr()
    assert main(["--params", str(params), "compare", "--baseline"]) == 0
    out = capsys.readouterr().out
    assert "**No drift**" in out and "every learning floor checked is met (2 not checked, see below)" in out
    assert "| not checked | mt/age | (no family) | trivial | no trivial baseline |" in out
    # vit's multitask age MAE falls to 2.0 on both seeds: it now beats resnet's 3.25 on mt/age
    for seed in (0, 1):
        edit_result(tmp_path / "metrics", "mt", VIT, seed, edit=lambda result: result["components"][1].update(
            test_score=2.0))
    capsys.readouterr()
    assert main(["--params", str(params), "compare", "--baseline"]) == 1
    rank_rows = [line for line in capsys.readouterr().out.splitlines() if "| rank |" in line]
    assert any("| mt/age |" in r and "`test_vit`" in r and "| 2 | 1 |" in r for r in rank_rows)
    assert any("| mt/age |" in r and "`test_resnet`" in r and "| 1 | 2 |" in r for r in rank_rows)
