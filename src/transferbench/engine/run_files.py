"""A run's two output files: its metrics (the numbers ``dvc metrics show`` prints) and its record (who and what
made them), at the same relative path under ``<metrics_dir>`` and ``<metrics_dir>.runs``.

The engine and the retrieve stage write them (``write_result``); ``evaluation.results`` reads them back into one
result (``load_result``). The layout and the keys are described in ``evaluation.results``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferbench.atomic import write_json
from transferbench.errors import TransferbenchError


class ResultsError(TransferbenchError):
    """A missing or malformed fine-tuning metrics file (names the file and key)."""


def result_path(metrics_dir: str | Path, task: str, backbone: str, seed: int, mode: str = "full") -> Path:
    """A run's metrics file under ``metrics_dir`` (its record: the same path under ``records_dir(metrics_dir)``)."""
    if mode == "frozen":
        return Path(metrics_dir) / task / backbone / "frozen.json"
    return Path(metrics_dir) / task / backbone / mode / f"seed{seed}.json"


def records_dir(metrics_dir: str | Path) -> Path:
    """Where the records of the metrics files under ``metrics_dir`` are: ``<metrics_dir>.runs`` (dvc.yaml declares it
    as ``${compare.metrics_dir}.runs``), outside every directory DVC reads as metrics."""
    metrics_dir = Path(metrics_dir)
    return metrics_dir.with_name(f"{metrics_dir.name}.runs")


def record_path(metrics_dir: str | Path, metrics_file: str | Path) -> Path:
    """The record of ``metrics_file`` (a file under ``metrics_dir``)."""
    return records_dir(metrics_dir) / Path(metrics_file).relative_to(metrics_dir)


# The numbers of a run that are not val_<m>/test_<m> metrics: its selection scores and the trivial baseline's, how
# long it trained and when it peaked. Every other key that is not a number is the record's.
METRIC_KEYS = ("val_score", "test_score", "baseline_score", "best_epoch", "epochs_run", "best_val_loss",
               "train_seconds", "seconds")
COMPONENT_METRIC_KEYS = ("val_score", "test_score", "baseline_score")


def _number(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def split_result(result: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, record) of one run's result: the numbers it scored, and everything that says who and what made them.

    ``None`` scores stay in the metrics (a retrieval run has no validation score; DVC skips them)."""
    metrics: dict[str, Any] = {}
    record: dict[str, Any] = {}
    for key, value in result.items():
        if key == "components" and isinstance(value, list):
            record[key] = [{k: v for k, v in entry.items() if k not in COMPONENT_METRIC_KEYS} for entry in value]
            metrics[key] = {entry["task"]: {k: entry[k] for k in COMPONENT_METRIC_KEYS if k in entry}
                            for entry in value}
        elif (key in METRIC_KEYS or key.startswith(("val_", "test_"))) and _number(value):
            metrics[key] = value
        else:
            record[key] = value
    return metrics, record


def write_result(metrics_dir: str | Path, result: Mapping[str, Any]) -> Path:
    """Write one run's result as its metrics file and its record (``split_result``); returns the metrics file.

    The record is written first: a metrics file always has the record of the run that made it, or a newer one (each
    file is written to a temporary name and renamed)."""
    path = result_path(metrics_dir, result["task"], result["backbone"], result["seed"], result["mode"])
    metrics, record = split_result(result)
    write_json(record_path(metrics_dir, path), record)
    write_json(path, metrics)
    return path


def _read_object(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: {what} not found (has the finetune stage run?)") from None
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ResultsError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return dict(raw)


def load_result(metrics_file: str | Path, record_file: str | Path) -> dict[str, Any]:
    """One run's whole result: its record with its metrics merged in (a key in both is an error, naming both)."""
    metrics_file, record_file = Path(metrics_file), Path(record_file)
    metrics = _read_object(metrics_file, "metrics file")
    record = _read_object(record_file, "run record (written with the metrics file)")
    both = sorted(set(metrics) & set(record) - {"components"})
    if both:
        raise ResultsError(f"{metrics_file}: keys {both} are also in its record {record_file}")
    merged = {**record, **{k: v for k, v in metrics.items() if k != "components"}}
    scores = metrics.get("components")
    if scores is not None:
        if not isinstance(scores, Mapping) or not isinstance(record.get("components"), list):
            raise ResultsError(f"{metrics_file}: key 'components' must be an object of per-task scores, and its "
                               f"record {record_file} must list the components")
        merged["components"] = [{**entry, **scores.get(entry.get("task"), {})} if isinstance(entry, Mapping)
                                else entry for entry in record["components"]]
    return merged


def read_run(metrics_dir: str | Path, task: str, backbone: str, seed: int = 0, mode: str = "full") -> dict[str, Any]:
    """The whole result of one run (``load_result``) found by its place in ``metrics_dir``."""
    path = result_path(metrics_dir, task, backbone, seed, mode)
    return load_result(path, record_path(metrics_dir, path))
