"""The drift gate: `transferbench compare --baseline` passes on an unchanged study, fails (exit 1) on rank
moves and structural changes, exits 2 on a bad baseline and 3 on a bug; the committed baseline fits its schema."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from study_files import REPO_PARAMS, assert_ranks_file
from transferbench.cli import EXIT_DRIFT, EXIT_ERROR, EXIT_INTERNAL_ERROR, main
from transferbench.config import load_settings
from transferbench.evaluation import drift
from transferbench.evaluation.drift import compare_rank_tables, drift_markdown, has_drift, load_rank_table
from transferbench.evaluation.ranking import SCHEMA
from transferbench.evaluation.study import evaluations, task_metrics

SCORES = {
    "covid_geo": {"test_resnet": [0.60, 0.62, 0.61], "test_convnext": [0.50, 0.52, 0.51],
                  "test_vit": [0.70, 0.71, 0.72], "test_vit2": [0.40, 0.45, 0.42]},
    "synthetic": {"test_resnet": [0.80, 0.80, 0.80], "test_convnext": [0.30, 0.60, 0.90],
                  "test_vit": [0.55, 0.55, 0.55], "test_vit2": [0.35, 0.35, 0.35]},
}


@pytest.fixture
def baseline(study) -> tuple[Path, Path]:
    """Run the study's compare once and keep its table as the committed baseline."""
    params = study(SCORES, {"covid_geo": "balanced_accuracy", "synthetic": "accuracy"})
    assert main(["--params", str(params), "compare"]) == 0
    assert assert_ranks_file(params)["average_rank"]["families"].keys() == {"convnet", "transformer"}
    path = params.parent / "baseline.json"  # params compare.baseline
    shutil.copy(params.parent / "reports" / "rank_table.json", path)
    return params, path


def test_unedited_baseline_passes(baseline, capsys):
    params, path = baseline
    assert main(["--params", str(params), "compare", "--baseline", str(path)]) == 0
    out = capsys.readouterr().out
    assert "**No drift**" in out and "Nothing moved." in out
    assert main(["--params", str(params), "compare", "--baseline"]) == 0  # params compare.baseline


def test_swapping_two_ranks_fails_and_names_both_backbones_and_the_task(baseline, capsys, tmp_path):
    params, path = baseline
    table = json.loads(path.read_text())
    # covid_geo: test_resnet (0.61, rank 2) now below test_convnext (0.51, rank 3)
    table["tasks"]["covid_geo"]["backbones"]["test_resnet"]["mean"] = 0.50
    edited = tmp_path / "edited_baseline.json"
    edited.write_text(json.dumps(table))
    report_file = tmp_path / "summary.md"
    assert main(["--params", str(params), "compare", "--baseline", str(edited),
                 "--drift-report", str(report_file)]) == 1
    out = capsys.readouterr().out
    assert out == report_file.read_text()
    assert "**DRIFT" in out
    rank_rows = [line for line in out.splitlines() if "| rank |" in line]
    assert len(rank_rows) == 2
    assert any("covid_geo" in r and "`test_resnet`" in r and "| 3 | 2 |" in r for r in rank_rows)
    assert any("covid_geo" in r and "`test_convnext`" in r and "| 2 | 3 |" in r for r in rank_rows)
    assert "hand-edited" in out  # the edited file's stored ranks no longer match its means


def test_move_within_seed_spread_is_reported_not_drift(baseline):
    params, path = baseline
    old = json.loads(path.read_text())
    new = json.loads(path.read_text())
    # synthetic/test_convnext has std 0.3 over seeds: a 0.1 move is noise; it changes no rank.
    new["tasks"]["synthetic"]["backbones"]["test_convnext"]["mean"] += 0.1
    changes = compare_rank_tables(old, new, tolerance=0.05)
    assert [(c.kind, c.subject, c.drift) for c in changes] == [("metric", "test_convnext", False)]
    assert "within seed std" in changes[0].why
    # the same move on a backbone whose seeds agree is drift
    new = json.loads(path.read_text())
    new["tasks"]["synthetic"]["backbones"]["test_vit2"]["mean"] += 0.1
    assert has_drift(compare_rank_tables(old, new, tolerance=0.05))
    assert not has_drift(compare_rank_tables(old, new, tolerance=0.2))


def test_family_order_change_is_drift(baseline):
    _, path = baseline
    old = json.loads(path.read_text())
    new = json.loads(path.read_text())
    for task in new["tasks"].values():  # every convnet falls to the bottom
        for name, cell in task["backbones"].items():
            if new["backbones"][name]["family"] == "convnet":
                cell["mean"] = 0.0
    kinds = {c.kind for c in compare_rank_tables(old, new, tolerance=1.0) if c.drift}
    assert kinds == {"rank", "family_order"}


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({"schema": SCHEMA, "study": "x"}), "missing key 'multi_task'"),
    (json.dumps({"schema": SCHEMA, "study": "x", "multi_task": {}}), "missing key 'backbones'"),
    ('{"schema": "transferbench.rank_table/2", "study": "x"}', f"is not '{SCHEMA}'; regenerate"),
    ('{"schema": "something-else"}', "schema 'something-else' is not"),
])
def test_missing_or_malformed_baseline_is_an_error_not_a_pass(study, tmp_path, capsys, content, message):
    params = study(SCORES)  # the baseline is read first: the study is not ranked
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["--params", str(params), "compare", "--baseline", str(bad)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and str(bad) in err
    assert not (tmp_path / "reports").exists()


def test_baseline_missing_a_key_names_it(baseline, tmp_path, capsys):
    params, path = baseline
    table = json.loads(path.read_text())
    del table["tasks"]["synthetic"]["backbones"]["test_vit"]["mean"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(table))
    assert main(["--params", str(params), "compare", "--baseline", str(bad)]) == 2
    assert "missing key 'tasks.synthetic.backbones.test_vit.mean'" in capsys.readouterr().err


# Every backbone learned synthetic except the transformers, which sit at chance (1/3).
CHANCE_TRANSFORMERS = {
    "covid_geo": SCORES["covid_geo"],
    "synthetic": {"test_resnet": [0.95, 0.97, 0.96], "test_convnext": [0.92, 0.90, 0.94],
                  "test_vit": [0.33, 0.35, 0.31], "test_vit2": [0.30, 0.34, 0.32]},
}


def test_a_family_below_its_learning_floor_fails_the_gate_naming_task_family_and_floor(study, capsys):
    params = study(CHANCE_TRANSFORMERS, {"covid_geo": "balanced_accuracy", "synthetic": "accuracy"},
                   floors={"synthetic": 0.9})
    assert main(["--params", str(params), "compare"]) == 0  # the stage writes its reports either way
    shutil.copy(params.parent / "reports" / "rank_table.json", params.parent / "baseline.json")
    # Nothing moved against the baseline, yet the gate fails: the transformers never learned.
    assert main(["--params", str(params), "compare", "--baseline"]) == 1
    out = capsys.readouterr().out
    assert "**DRIFT: 1 change(s) fail the gate**" in out and "Nothing moved." in out
    (failed,) = [line for line in out.splitlines() if "fails the gate" in line and "| synthetic |" in line]
    assert "| transformer |" in failed and ">= 0.9" in failed and "0.3300 (test_vit)" in failed
    (met,) = [line for line in out.splitlines() if line.startswith("| yes | synthetic | convnet |")]
    assert "0.9600 (test_resnet)" in met


def test_learning_floors_are_ceilings_for_lower_is_better_metrics_and_skip_tasks_not_run():
    from transferbench.evaluation.drift import check_learning_floors

    table = {"backbones": {"a": {"family": "convnet"}, "b": {"family": "transformer"}},
             "tasks": {"age": {"metric": "mae", "higher_is_better": False,
                               "backbones": {"a": {"mean": 4.0}, "b": {"mean": 9.0}}}}}
    checks = {c.subject: c for c in check_learning_floors(table, {"age": 6.0, "synthetic": 0.9})}
    assert not checks["convnet"].drift and checks["convnet"].before == "<= 6"
    assert checks["transformer"].drift and "9.0000 mae, not <= 6" in checks["transformer"].why
    assert not checks["(no family)"].drift and checks["(no family)"].task == "synthetic"


def test_a_learning_floor_on_an_undefined_task_fails_at_load(tmp_path):
    import yaml

    from transferbench.config import ConfigError, load_settings
    from study_files import REPO_PARAMS

    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["compare"]["learning_floors"] = {"synthetc": 0.9}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="compare.learning_floors.synthetc"):
        load_settings(path)


# --------------------------------------------------------------------------- the committed baseline
SETTINGS = load_settings(REPO_PARAMS)
COMMITTED = REPO_PARAMS.parent / SETTINGS.compare.baseline


def test_committed_baseline_fits_the_schema_and_is_the_studys():
    table = load_rank_table(COMMITTED)  # RankTableSchema: keys, types, metrics, directions, ranks within 1..n
    assert table["study"] == SETTINGS.study.name
    assert {b: e["family"] for b, e in table["backbones"].items()} == \
        {b: SETTINGS.backbone(b).family for b in SETTINGS.study.backbones}
    specs = evaluations(SETTINGS)
    assert list(table["tasks"]) == list(specs)
    for evaluation, metric in task_metrics(SETTINGS, specs).items():
        t = table["tasks"][evaluation]
        assert (t["metric"], t["higher_is_better"]) == (metric.name, metric.higher_is_better), evaluation
        assert list(t["backbones"]) == list(specs[evaluation].backbones), evaluation


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """An edit of a rank table: set (or, with value ``...``, delete) the dotted ``path``."""
    *parents, last = path.split(".")

    def edit(table: dict) -> None:
        for key in parents:
            table = table[key]
        if value is ...:
            del table[last]
        else:
            table[last] = value

    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("study", ...), "missing key 'study'"),
    (_set("backbones.test_vit.family", ...), "missing key 'backbones.test_vit.family'"),
    (_set("tasks.covid_geo.metric", ...), "missing key 'tasks.covid_geo.metric'"),
    (_set("tasks.covid_geo.metric", ""), "key 'tasks.covid_geo.metric'"),
    (_set("tasks.synthetic_age.higher_is_better", ...), "missing key 'tasks.synthetic_age.higher_is_better'"),
    (_set("tasks.synthetic_age.higher_is_better", "no"),
     "key 'tasks.synthetic_age.higher_is_better' has the wrong type (str)"),
    (_set("tasks.covid_geo.backbones", {}), "key 'tasks.covid_geo.backbones' is empty"),
    (_set("tasks.covid_geo.backbones.test_vit.mean", "0.5"),
     "key 'tasks.covid_geo.backbones.test_vit.mean' has the wrong type (str)"),
    (_set("tasks.covid_geo.backbones.test_vit.mean", float("nan")), "key 'tasks.covid_geo.backbones.test_vit.mean'"),
    (_set("tasks.covid_geo.backbones.test_vit.rank", True),
     "key 'tasks.covid_geo.backbones.test_vit.rank' has the wrong type (bool)"),
    (_set("tasks.covid_geo.backbones.test_vit.rank", 0), "key 'tasks.covid_geo.backbones.test_vit.rank': 0 is not "
                                                          "within 1..4"),
    (_set("tasks.synthetic_b.backbones.test_vit.rank", 3), "key 'tasks.synthetic_b.backbones.test_vit.rank': 3 is not "
                                                            "within 1..2"),
    (_set("tasks.covid_geo.backbones.ghost", {"mean": 0.5, "rank": 1.0}),
     "key 'tasks.covid_geo.backbones.ghost': is not listed under 'backbones'"),
], ids=["no-study", "no-family", "no-metric", "empty-metric", "no-direction", "direction-not-bool", "no-backbones",
        "mean-not-number", "mean-nan", "rank-bool", "rank-0", "rank-above-n", "unlisted-backbone"])
def test_a_baseline_off_the_schema_is_refused_naming_file_and_key(tmp_path, edit, message):
    table = json.loads(COMMITTED.read_text())
    edit(table)
    bad = tmp_path / "edited_baseline.json"
    bad.write_text(json.dumps(table))
    with pytest.raises(drift.DriftError) as error:
        load_rank_table(bad)
    assert str(error.value).startswith(f"{bad}: ") and message in str(error.value)


def test_a_baseline_rank_out_of_range_exits_2(study, tmp_path, capsys):
    table = json.loads(COMMITTED.read_text())
    table["tasks"]["synthetic"]["backbones"]["test_vit"]["rank"] = 5.0
    bad = tmp_path / "edited_baseline.json"
    bad.write_text(json.dumps(table))
    assert main(["--params", str(study(SCORES)), "compare", "--baseline", str(bad)]) == EXIT_ERROR
    assert f"{bad}: key 'tasks.synthetic.backbones.test_vit.rank': 5 is not within 1..4" in capsys.readouterr().err


# --------------------------------------------------------------------------- structural drift
def _add_backbone(table: dict) -> None:
    table["backbones"]["test_extra"] = {**table["backbones"]["test_vit"], "model": "test_extra"}
    table["tasks"]["covid_geo"]["backbones"]["test_extra"] = {"mean": 0.1, "std": 0.0, "n_seeds": 3, "rank": 5.0}


def _remove_backbone(table: dict) -> None:
    del table["backbones"]["test_vit2"]
    for t in table["tasks"].values():
        t["backbones"].pop("test_vit2", None)


def _add_evaluation(table: dict) -> None:
    table["tasks"]["covid_geo:linear_probe"] = {**copy.deepcopy(table["tasks"]["covid_geo"]), "mode": "linear_probe"}


@pytest.mark.parametrize("edit, rows", [
    (_set("study", "renamed"),
     ["| (study) | `study` | smoke-tiny-random-init | renamed | study renamed"]),
    (_set("tasks.covid_geo", ...),
     ["| covid_geo | `evaluation` | present | absent | evaluation removed from the study |"]),
    (_add_evaluation,
     ["| covid_geo:linear_probe | `evaluation` | absent | present | evaluation added to the study |"]),
    (_remove_backbone,
     ["| (study) | `test_vit2` | present | absent | backbone removed from the study |",
      "| covid_geo | `test_vit2` | present | absent | backbone removed from this evaluation |"]),
    (_add_backbone,
     ["| (study) | `test_extra` | absent | present | backbone added to the study |",
      "| covid_geo | `test_extra` | absent | present | backbone added to this evaluation |"]),
    (_set("tasks.synthetic_b.backbones.test_convnext", {"mean": 0.5, "std": 0.0, "n_seeds": 3, "rank": 2.0}),
     ["| synthetic_b | `test_convnext` | absent | present | backbone added to this evaluation |"]),
    (_set("tasks.synthetic_b.metric", "balanced_accuracy"),
     ["| synthetic_b | `metric` | accuracy | balanced_accuracy | ranking metric changed"]),
    (_set("tasks.synthetic_age.higher_is_better", True),
     ["| synthetic_age | `higher_is_better` | lower is better | higher is better | metric direction changed"]),
    (_set("backbones.test_vit.family", "convnet"),
     ["| (study) | `test_vit` | transformer | convnet | backbone's family changed |"]),
], ids=["study-renamed", "evaluation-removed", "evaluation-added", "backbone-removed", "backbone-added",
        "backbone-added-to-an-evaluation", "metric", "direction", "family"])
def test_each_structural_change_is_drift_with_its_own_line(edit, rows):
    baseline = load_rank_table(COMMITTED)
    current = copy.deepcopy(baseline)
    edit(current)
    changes = compare_rank_tables(baseline, current, tolerance=0.05)
    assert has_drift(changes)
    report = drift_markdown(changes, baseline=str(COMMITTED), tolerance=0.05)
    for row in rows:
        assert f"| **yes** | structure {row}" in report, report
    # and the same change seen from the other side, as the baseline, is drift too
    assert has_drift(compare_rank_tables(current, baseline, tolerance=0.05))


def test_a_different_study_exits_1_naming_each_structural_change(study, tmp_path, capsys):
    params = study(SCORES, {"covid_geo": "balanced_accuracy", "synthetic": "accuracy"})
    report_file = tmp_path / "summary.md"
    assert main(["--params", str(params), "compare", "--baseline", str(COMMITTED),
                 "--drift-report", str(report_file)]) == EXIT_DRIFT
    out = capsys.readouterr().out
    assert out == report_file.read_text()
    assert "| **yes** | structure | (study) | `study` | smoke-tiny-random-init | unit-study |" in out
    for evaluation in ("synthetic_age", "synthetic_b", "synthetic_seg_depth/synthetic_seg"):
        assert f"| **yes** | structure | {evaluation} | `evaluation` | present | absent |" in out


# --------------------------------------------------------------------------- exit codes
def test_an_internal_error_exits_3_with_its_traceback_not_1(study, capsys, monkeypatch):
    params = study(SCORES, {"covid_geo": "balanced_accuracy", "synthetic": "accuracy"})

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug in the gate")

    monkeypatch.setattr(drift, "compare_rank_tables", broken)
    assert main(["--params", str(params), "compare", "--baseline", str(COMMITTED)]) == EXIT_INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a bug in the gate'" in err
    assert "internal error (a bug, not drift): exit 3" in err


def test_compare_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as done:
        main(["compare", "--help"])
    assert done.value.code == 0
    epilog = capsys.readouterr().out.split("exit codes", 1)[1]
    for code, meaning in ((0, "no drift"), (EXIT_DRIFT, "drift"), (EXIT_ERROR, "missing or malformed baseline"),
                          (EXIT_INTERNAL_ERROR, "internal error")):
        assert f"\n  {code}  " in epilog and meaning in epilog.split(f"\n  {code}  ", 1)[1].split("\n  ")[0]
