"""Evaluations beyond one mode of one kind (issue #21): linear probe vs full fine-tuning, the paper's task
groups, lower-is-better age MAE in the rank table and the drift gate, and the "trivial" learning floor.

Each test writes a study's results, metrics files and records (the training stages' output contract), with
hand-picked scores, and runs the real ``transferbench compare``; expected values are worked out by hand in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study_files import assert_ranks_file, edit_result
from transferbench.cli import main
from transferbench.engine.run_files import records_dir

FULL_AND_PROBE = {
    "s": {"test_resnet": [0.9, 0.8], "test_vit": [0.9, 0.9]},
    "s:linear_probe": {"test_resnet": [0.7, 0.7], "test_vit": [0.5, 0.4]},
}
AGE = {"age": {"test_resnet": [3.0, 5.0], "test_vit": [6.0, 8.0]}}  # MAE in years: lower is better


def _table(params: Path) -> dict:
    return json.loads((params.parent / "reports" / "rank_table.json").read_text())


def _set_baseline(params: Path, task: str, score: float) -> None:
    """Record a trivial baseline (as the age kind does: predicting the training mean) in every run of ``task``."""
    metrics_dir = params.parent / "metrics"
    records = sorted((records_dir(metrics_dir) / task).rglob("seed*.json"))
    assert records  # the study wrote the task's runs
    for path in records:
        backbone, mode, seed = path.parts[-3], path.parts[-2], int(path.stem.removeprefix("seed"))
        edit_result(metrics_dir, task, backbone, seed, mode, baseline="training-mean age", baseline_score=score)


def test_linear_probe_is_its_own_evaluation_and_the_gain_table_pairs_seeds(study):
    params = study(FULL_AND_PROBE, {"s": "accuracy", "s:linear_probe": "accuracy"})
    assert main(["--params", str(params), "compare"]) == 0
    table = _table(params)
    # full: resnet rank 2, vit 1; linear probe: resnet 1, vit 2 -> both families average 1.5 over 2 evaluations
    ranks = assert_ranks_file(params)
    assert ranks["average_rank"]["families"] == {"convnet": 1.5, "transformer": 1.5} and ranks["n_evaluations"] == 2

    assert list(table["tasks"]) == ["s", "s:linear_probe"]
    assert table["tasks"]["s:linear_probe"]["mode"] == "linear_probe" and table["tasks"]["s"]["mode"] == "full"
    assert table["tasks"]["s:linear_probe"]["group"] == "linear evaluation"
    # linear probe: resnet 0.7 > vit 0.45 -> ranks 1, 2; full: resnet 0.85 < vit 0.9 -> ranks 2, 1
    assert table["tasks"]["s:linear_probe"]["backbones"]["test_resnet"]["rank"] == 1
    assert table["tasks"]["s"]["backbones"]["test_resnet"]["rank"] == 2

    gain = table["gain_from_full_finetuning"]["s"]
    # resnet: 0.9-0.7, 0.8-0.7 = 0.2, 0.1 -> mean 0.15, std 0.0707; vit: 0.4, 0.5 -> mean 0.45
    assert gain["backbones"]["test_resnet"]["mean"] == pytest.approx(0.15)
    assert gain["backbones"]["test_resnet"]["std"] == pytest.approx(0.1 / 2 ** 0.5)
    assert gain["backbones"]["test_vit"]["mean"] == pytest.approx(0.45)
    assert gain["families"]["convnet"]["mean"] == pytest.approx(0.15)
    assert gain["families"]["transformer"]["mean"] == pytest.approx(0.45) and gain["families"]["transformer"]["n"] == 2

    markdown = (params.parent / "reports" / "rank_table.md").read_text()
    assert "## Gain from full fine-tuning over linear evaluation" in markdown
    assert "| `s` | accuracy | 0.1500 ± 0.0707 | 0.4500 ± 0.0707 | **0.1500 ± 0.0707** | **0.4500 ± 0.0707** |" \
        in markdown
    assert "## By task group (the paper's tables)" in markdown
    assert "| linear evaluation | `s:linear_probe` |" in markdown


def test_groups_average_ranks_within_each_group(study):
    params = study({**FULL_AND_PROBE, **AGE}, {"s": "accuracy", "s:linear_probe": "accuracy", "age": "mae"})
    assert main(["--params", str(params), "compare"]) == 0
    groups = _table(params)["groups"]
    assert list(groups) == ["ungrouped", "linear evaluation", "face"]  # study order of first appearance
    assert groups["face"]["evaluations"] == ["age"]
    # face: age MAE resnet 4 < vit 7 -> resnet rank 1; linear evaluation: resnet rank 1
    assert groups["face"]["backbones"] == {"test_resnet": 1.0, "test_vit": 2.0}
    assert groups["linear evaluation"]["families"] == {"convnet": 1.0, "transformer": 2.0}
    assert groups["ungrouped"]["backbones"] == {"test_resnet": 2.0, "test_vit": 1.0}


def test_mae_ranks_ascending_and_the_gate_sees_an_mae_swap(study, capsys):
    params = study(AGE, {"age": "mae"}, tolerance=0.5)
    assert main(["--params", str(params), "compare"]) == 0
    table = _table(params)
    assert table["tasks"]["age"]["higher_is_better"] is False
    assert table["tasks"]["age"]["backbones"]["test_resnet"]["rank"] == 1  # MAE 4 beats 7
    baseline = params.parent / "baseline.json"
    baseline.write_text(json.dumps(table))
    assert main(["--params", str(params), "compare", "--baseline", str(baseline)]) == 0

    # resnet's MAE rises to 9 on both seeds: now worse than vit's 7 -> ranks swap, the gate fails
    for seed in (0, 1):
        edit_result(params.parent / "metrics", "age", "test_resnet", seed, test_mae=9.0)
    capsys.readouterr()
    assert main(["--params", str(params), "compare", "--baseline", str(baseline)]) == 1
    rank_rows = [line for line in capsys.readouterr().out.splitlines() if "| rank |" in line]
    assert any("| age |" in r and "`test_resnet`" in r and "| 1 | 2 |" in r for r in rank_rows)  # MAE 9 > 7
    assert any("| age |" in r and "`test_vit`" in r and "| 2 | 1 |" in r for r in rank_rows)


def test_trivial_learning_floor_needs_each_family_to_beat_the_baseline(study, capsys):
    params = study(AGE, {"age": "mae"}, floors={"age": "trivial"})
    _set_baseline(params, "age", 6.5)  # predicting the training mean: MAE 6.5
    assert main(["--params", str(params), "compare"]) == 0
    assert _table(params)["tasks"]["age"]["trivial_baseline"] == 6.5
    baseline = params.parent / "baseline.json"
    baseline.write_text((params.parent / "reports" / "rank_table.json").read_text())
    capsys.readouterr()
    # convnet's best (resnet, 4) beats 6.5; transformer's best (vit, 7) does not: the gate fails by name
    assert main(["--params", str(params), "compare", "--baseline", str(baseline)]) == 1
    out = capsys.readouterr().out
    assert "LEARNING FLOOR: the best transformer backbone (test_vit) scores 7.0000 mae, not < 6.5 (trivial baseline)" \
        in out

    _set_baseline(params, "age", 7.5)
    capsys.readouterr()
    assert main(["--params", str(params), "compare", "--baseline", str(baseline)]) == 0  # both beat 7.5 now
    assert "LEARNING FLOOR" not in capsys.readouterr().out
