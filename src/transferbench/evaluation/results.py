"""Strict readers of the study's results: one metrics JSON per (task, backbone, mode, seed).

An *evaluation* is one column of the rank table: a task in one mode. Its id is the task's name for
full fine-tuning (``covid_geo``) and for retrieval, ``<task>:linear_probe`` for linear evaluation.

The finetune stage writes ``<metrics_dir>/<task>/<backbone>/<mode>/seed<S>.json`` and the retrieve
stage ``<metrics_dir>/<task>/<backbone>/frozen.json`` (deterministic: no seeds, seed 0 in the file,
no validation split): a flat object with ``task``, ``mode``,
``backbone``, ``family``, ``weights``, ``seed``, ``mlflow_run_id``, ``metric`` (the
selection metric named in ``params.yaml`` ``tasks.<task>.metric``) and ``val_<m>`` / ``test_<m>``
for each metric, plus optional provenance (``model``, ``random_init``, ``data_version``,
``git_commit``, ``best_epoch``, ...). A missing or wrong key fails naming the file and the key:
ranking stale or partial results silently would defeat the point of the study.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferbench.errors import TransferbenchError


class ResultsError(TransferbenchError):
    """A missing or malformed fine-tuning metrics file (names the file and key)."""


@dataclass(frozen=True)
class FinetuneResult:
    """One (task, backbone, seed) fine-tuning outcome, as recorded by training."""

    path: Path
    task: str
    mode: str  # full | linear_probe | frozen (retrieval)
    backbone: str
    family: str
    weights: str
    seed: int
    mlflow_run_id: str
    metric: str
    val_score: float | None  # None: no validation split (retrieval)
    test_score: float
    # Every key of the file, for tags and reports (val_*/test_* metrics, provenance).
    raw: Mapping[str, Any]

    @property
    def evaluation(self) -> str:
        return evaluation_id(self.task, self.mode)

    @property
    def model_uri(self) -> str:
        """Where training logged the model: ``mlflow.pytorch.log_model(..., name="model")``."""
        return f"runs:/{self.mlflow_run_id}/model"

    def scores(self, split: str) -> dict[str, float]:
        """All numeric ``<split>_<m>`` values, keyed by ``m``."""
        prefix = f"{split}_"
        return {k[len(prefix):]: float(v) for k, v in self.raw.items()
                if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)}


MODES = ("full", "linear_probe", "frozen")


def evaluation_id(task: str, mode: str) -> str:
    """``task`` for full fine-tuning and retrieval (frozen), ``task:<mode>`` otherwise."""
    return task if mode in ("full", "frozen") else f"{task}:{mode}"


@dataclass(frozen=True)
class EvaluationSpec:
    """Which results one evaluation reads: its task, mode, selection metric name and seeds."""

    task: str
    mode: str
    metric: str
    seeds: tuple[int, ...]


def result_path(metrics_dir: str | Path, task: str, backbone: str, seed: int, mode: str = "full") -> Path:
    if mode == "frozen":
        return Path(metrics_dir) / task / backbone / "frozen.json"
    return Path(metrics_dir) / task / backbone / mode / f"seed{seed}.json"


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in raw:
        raise ResultsError(f"{path}: missing required key '{key}'")
    value = raw[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ResultsError(f"{path}: key '{key}' must be {names}, got {value!r}")
    return value


def _score(raw: Mapping[str, Any], key: str, path: Path) -> float:
    value = float(_require(raw, key, (int, float), path))
    if not math.isfinite(value):
        raise ResultsError(f"{path}: key '{key}' must be a finite number, got {value!r}")
    return value


def read_result(path: str | Path, *, task: str | None = None, backbone: str | None = None,
                seed: int | None = None, metric: str | None = None, mode: str | None = None) -> FinetuneResult:
    """Read one metrics JSON; the keyword arguments are what the file must say (from its path/params)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: metrics file not found (has the finetune stage run?)") from None
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ResultsError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    result = FinetuneResult(
        path=path,
        task=_require(raw, "task", str, path),
        mode=_require(raw, "mode", str, path),
        backbone=_require(raw, "backbone", str, path),
        family=_require(raw, "family", str, path),
        weights=_require(raw, "weights", str, path),
        seed=_require(raw, "seed", int, path),
        mlflow_run_id=_require(raw, "mlflow_run_id", str, path),
        metric=_require(raw, "metric", str, path),
        val_score=0.0, test_score=0.0, raw=dict(raw))
    if result.mode not in MODES:
        raise ResultsError(f"{path}: key 'mode' must be one of {MODES}, got {result.mode!r}")
    expected = {"task": task, "backbone": backbone, "seed": seed, "metric": metric, "mode": mode}
    for key, want in expected.items():
        if want is not None and getattr(result, key) != want:
            raise ResultsError(f"{path}: key '{key}' is {getattr(result, key)!r} but {want!r} was expected "
                               f"(stale results? re-run the finetune stage)")
    return FinetuneResult(**{**result.__dict__,
                             "val_score": None if result.mode == "frozen" else
                             _score(raw, f"val_{result.metric}", path),
                             "test_score": _score(raw, f"test_{result.metric}", path)})


def read_study_results(metrics_dir: str | Path, *, evaluations: Mapping[str, EvaluationSpec],
                       backbones: Mapping[str, str]) -> list[FinetuneResult]:
    """Every result the study declares: ``evaluations`` by id, ``backbones`` maps backbone -> family.

    Files for backbones, modes or seeds outside the study are ignored; a declared one that is
    missing is an error, so a partial study is never ranked as if it were whole.
    """
    results = []
    for spec in evaluations.values():
        for backbone, family in backbones.items():
            for seed in spec.seeds:
                result = read_result(result_path(metrics_dir, spec.task, backbone, seed, spec.mode), task=spec.task,
                                     backbone=backbone, seed=seed, metric=spec.metric, mode=spec.mode)
                if result.family != family:
                    raise ResultsError(f"{result.path}: key 'family' is {result.family!r} but the backbone "
                                       f"catalogue in params.yaml says {family!r}")
                results.append(result)
    return results

