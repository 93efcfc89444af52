"""DVC's own views of the study ``make repro`` made: ``dvc metrics show`` and ``dvc plots show`` (marker ``study``).

The metrics files hold numbers only (identity and lineage are in the records, ``<compare.metrics_dir>.runs``), so
``dvc metrics show`` is a table of scores: a few columns per task, one small file of average ranks for the study, one
per sensitivity task. Every learning curve's title in ``dvc plots show`` names its task, backbone, mode, seed and
weights (random-init where the backbone is).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from transferbench.engine.run_files import load_result, record_path

pytestmark = pytest.mark.study

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
METRICS_DIR = PARAMS["compare"]["metrics_dir"]


def _dvc(*args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(DVC), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value


@pytest.fixture(scope="module")
def metrics() -> dict[str, dict[str, Any]]:
    """``dvc metrics show --json``: metrics file -> its flattened values."""
    shown = json.loads(_dvc("metrics", "show", "--json"))
    files = shown[""]["data"]
    if not any(path.startswith(METRICS_DIR) for path in files):
        pytest.fail(f"dvc metrics show lists no {METRICS_DIR} files: run `make repro` first")
    errors = {path: entry["error"] for path, entry in files.items() if "error" in entry}
    assert not errors, errors
    return {path: dict(_leaves(entry["data"])) for path, entry in files.items()}


def test_metrics_files_hold_numbers_only(metrics) -> None:
    """No identity, run id, commit or label in a metrics file: they are in its record, which has them."""
    for path, values in metrics.items():
        text = {k: v for k, v in values.items() if isinstance(v, str)}
        assert not text, f"{path} holds text (it belongs in its record): {text}"
    runs = [p for p in metrics if p.startswith(f"{METRICS_DIR}/") and not p.endswith("skipped.json")]
    assert runs
    for path in runs:
        result = load_result(REPO / path, record_path(REPO / METRICS_DIR, REPO / path))
        assert re.fullmatch(r"[0-9a-f]{32}", result["mlflow_run_id"]), path
        assert {"task", "backbone", "family", "weights_label", "data_version", "git_commit"} <= set(result), path
        assert "test_score" in metrics[path], path


def test_the_study_and_sensitivity_metrics_are_small_tables(metrics) -> None:
    """The rank table and the sensitivity summaries are reports (DVC outs); what DVC shows of them is a few numbers."""
    ranks = PARAMS["compare"]["ranks_file"]
    sensitivity = [f"{PARAMS['sensitivity']['metrics_dir']}/{task}.json" for task in PARAMS["sensitivity"]["tasks"]]
    assert ranks in metrics and set(sensitivity) <= set(metrics)
    assert not [p for p in metrics if p.startswith(("reports/", PARAMS["sensitivity"]["reports_dir"]))]
    families = {k.split(".")[-1]: v for k, v in metrics[ranks].items() if k.startswith("average_rank.families.")}
    table = json.loads((REPO / PARAMS["data"]["reports_dir"] / "rank_table.json").read_text())
    assert families == {f: v["average_rank"] for f, v in table["families"].items()}
    backbones = len(PARAMS["study"]["backbones"])
    assert len(metrics[ranks]) <= 2 + backbones + 2
    for path in sensitivity:
        assert len(metrics[path]) <= 3 * backbones + 1, sorted(metrics[path])


def test_each_task_reads_as_one_narrow_table(metrics) -> None:
    """Per task (``dvc metrics show metrics/finetune/<task>``): the task kind's metrics on val and test, the selection
    scores, the training record's numbers; not a column per run id, commit or per-query AP."""
    by_task: dict[str, set[str]] = {}
    for path, values in metrics.items():
        if path.startswith(f"{METRICS_DIR}/"):
            by_task.setdefault(path.split("/")[len(Path(METRICS_DIR).parts)], set()).update(values)
    assert set(PARAMS["study"]["tasks"]) <= set(by_task)
    wide = {task: len(columns) for task, columns in by_task.items() if len(columns) > 40}
    assert not wide, f"tasks with more than 40 metric columns: {wide}"
    shown = _dvc("metrics", "show", f"{METRICS_DIR}/covid_geo")
    header = shown.splitlines()[0].split()
    assert header[0] == "Path" and "test_score" in header and "mlflow_run_id" not in header
    assert len(header) <= 20, header


def test_every_learning_curve_is_titled_by_task_backbone_seed_and_weights() -> None:
    shown = json.loads(_dvc("plots", "show", "--json"))["data"]
    curves = {plot_id: entries for plot_id, entries in shown.items() if plot_id.startswith("plots/finetune/")}
    assert curves, f"no learning curves in dvc plots show: {sorted(shown)[:5]}"
    weights = {name: entry.get("weights", "none") for name, entry in PARAMS["backbones"].items()}
    for plot_id, entries in curves.items():
        title = entries[0]["content"]["title"]
        title = title["text"] if isinstance(title, Mapping) else title
        task, backbone, mode, name = Path(plot_id).relative_to("plots/finetune").parts
        seed = re.fullmatch(r"seed(\d+)-([a-z-]+)\.csv", name)
        assert seed and title == plot_id, (plot_id, title)
        assert task in PARAMS["tasks"] and backbone in PARAMS["study"]["backbones"] and mode in ("full", "linear_probe")
        assert int(seed.group(1)) in PARAMS["study"]["seeds"]
        label = seed.group(2)
        assert (label == "random-init") == (weights[backbone] == "none"), (plot_id, weights[backbone])
