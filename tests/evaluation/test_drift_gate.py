"""The drift gate: `transferbench compare --baseline` passes on an unchanged study and fails on rank moves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from transferbench.cli import main
from transferbench.evaluation.drift import compare_rank_tables, has_drift
from transferbench.evaluation.ranking import SCHEMA

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
def test_missing_or_malformed_baseline_is_an_error_not_a_pass(baseline, tmp_path, capsys, content, message):
    params, path = baseline
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["--params", str(params), "compare", "--baseline", str(bad)]) == 2
    assert message in capsys.readouterr().err


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
