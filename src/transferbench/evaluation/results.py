"""Strict readers of the study's results: one metrics JSON per (task, backbone, mode, seed).

An *evaluation* is one column of the rank table: a task in one mode. Its id is the task's name for
full fine-tuning (``covid_geo``) and for retrieval, ``<task>:linear_probe`` for linear evaluation,
and ``<multitask task>/<component>`` for one component of a multi-task model (PROTOCOL.md,
"Multi-task"): a multi-task run's file yields one result per component, scored by that component.

Each run leaves two files with the same relative path: its *metrics*
``<metrics_dir>/<task>/<backbone>/<mode>/seed<S>.json`` (retrieval: ``<task>/<backbone>/frozen.json``,
deterministic: no seeds, seed 0) and its *record* ``<metrics_dir>.runs/...`` (``records_dir``). The metrics file
holds only the run's numbers, what ``dvc metrics show`` / ``dvc metrics diff`` print (``METRIC_KEYS`` and the
numeric ``val_<m>`` / ``test_<m>`` for each metric; a multitask run's per-component ``val_score`` / ``test_score``
/ ``baseline_score`` under ``components.<task>``). The record holds who and what made them: ``task``, ``mode``,
``backbone``, ``family``, ``weights``, ``seed``, ``mlflow_run_id``, ``metric`` (the selection metric named in
``params.yaml`` ``tasks.<task>.metric``) and provenance (``model``, ``random_init``, ``data_version``,
``git_commit``, ``ray_run_name``, hyperparameters, ...); a multitask run's lists ``components``: per component
task, in ``tasks.<task>.components`` order, its ``task``, ``kind`` and selection ``metric``. ``write_result``
splits one run's result into the two files (``split_result``); the readers merge them back (``load_result``),
so a ``FinetuneResult.raw`` is the whole result: flat ``val_<component>.<m>`` / ``test_<component>.<m>`` keys and,
when a multitask model routes images between heads, ``val_routing_accuracy`` / ``test_routing_accuracy``.

A missing or wrong key fails naming the file and the key: ranking stale or partial results
silently would defeat the point of the study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from transferbench.engine.run_files import (
    ResultsError,
    load_result,
    record_path,
    result_path,
)


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
    # The component task this result scores, for one component of a multitask run (``task`` is then the
    # multitask task, ``metric`` and the scores the component's); None for every other result.
    component: str | None = None

    @property
    def evaluation(self) -> str:
        if self.component is not None:
            return component_evaluation_id(self.task, self.component)
        return evaluation_id(self.task, self.mode)

    @property
    def trivial_baseline(self) -> tuple[str, float] | None:
        """(what it is, its test score) of the run's trivial baseline when the file records one.

        A component's is its own entry's (a multitask run records none unless a component kind gives one).
        """
        source = self.raw
        if self.component is not None:
            source = next(e for e in self.raw["components"] if e.get("task") == self.component)
        score = source.get("baseline_score")
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            return str(source.get("baseline")), float(score)
        return None

    @property
    def model_uri(self) -> str:
        """Where training logged the served model (``engine.serving``: images in, answers out, no pickle)."""
        return f"runs:/{self.mlflow_run_id}/serving"

    def scores(self, split: str) -> dict[str, float]:
        """All numeric ``<split>_<m>`` values, keyed by ``m``."""
        prefix = f"{split}_"
        return {k[len(prefix):]: float(v) for k, v in self.raw.items()
                if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool)}


MODES = ("full", "linear_probe", "frozen")


def evaluation_id(task: str, mode: str) -> str:
    """``task`` for full fine-tuning and retrieval (frozen), ``task:<mode>`` otherwise."""
    return task if mode in ("full", "frozen") else f"{task}:{mode}"


def component_evaluation_id(multitask: str, component: str) -> str:
    """``<multitask>/<component>``: one component task of a multitask model, as a rank-table column."""
    return f"{multitask}/{component}"


@dataclass(frozen=True)
class EvaluationSpec:
    """Which results one evaluation reads: its task, mode, selection metric name and seeds.

    ``backbones``: the study backbones it runs on (``Settings.backbones_of``; None: all of them).
    ``component``: for a multitask model's component column, the component task (``metric`` is then
    the component's selection metric and ``task`` the multitask task).
    """

    task: str
    mode: str
    metric: str
    seeds: tuple[int, ...]
    backbones: tuple[str, ...] | None = None
    component: str | None = None


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path, where: str = "") -> Any:
    """``raw[key]`` of type ``kind``; ``where`` prefixes the key in messages (``components[0].``)."""
    if key not in raw:
        raise ResultsError(f"{path}: missing required key '{where}{key}'")
    value = raw[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ResultsError(f"{path}: key '{where}{key}' must be {names}, got {value!r}")
    return value


def _score(raw: Mapping[str, Any], key: str, path: Path, where: str = "") -> float:
    value = float(_require(raw, key, (int, float), path, where))
    if not math.isfinite(value):
        raise ResultsError(f"{path}: key '{where}{key}' must be a finite number, got {value!r}")
    return value


def _component_entry(raw: Mapping[str, Any], component: str, path: Path) -> tuple[Mapping[str, Any], str]:
    """The ``components`` entry of ``component`` in a multitask run's file, and its key prefix for messages."""
    entries = _require(raw, "components", list, path)
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ResultsError(f"{path}: key 'components[{i}]' must be an object, got {entry!r}")
        if _require(entry, "task", str, path, f"components[{i}].") == component:
            return entry, f"components[{i}]."
    listed = [e["task"] for e in entries]
    raise ResultsError(f"{path}: key 'components' has no entry for task {component!r} (it lists {listed}; "
                       f"stale results? re-run the finetune stage)")


def read_result(path: str | Path, record: str | Path, *, task: str | None = None, backbone: str | None = None,
                seed: int | None = None, metric: str | None = None, mode: str | None = None,
                component: str | None = None) -> FinetuneResult:
    """Read one run's metrics file ``path`` and its ``record``; the keyword arguments are what they must say (from
    their path/params). Messages name the metrics file.

    With ``component``, the file is a multitask run's and the result scores that component: its
    ``components`` entry gives the metric (checked against ``metric``) and the val/test scores.
    """
    path = Path(path)
    raw = load_result(path, record)
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
    source, where, val_key, test_key = raw, "", f"val_{result.metric}", f"test_{result.metric}"
    if component is not None:
        source, where = _component_entry(raw, component, path)
        val_key, test_key = "val_score", "test_score"
        result = replace(result, component=component, metric=_require(source, "metric", str, path, where))
    expected = {"task": task, "backbone": backbone, "seed": seed, "metric": metric, "mode": mode}
    for key, want in expected.items():
        if want is not None and getattr(result, key) != want:
            name = f"{where}metric" if key == "metric" else key
            raise ResultsError(f"{path}: key '{name}' is {getattr(result, key)!r} but {want!r} was expected "
                               f"(stale results? re-run the finetune stage)")
    return replace(result, val_score=None if result.mode == "frozen" else _score(source, val_key, path, where),
                   test_score=_score(source, test_key, path, where))


def read_study_results(metrics_dir: str | Path, *, evaluations: Mapping[str, EvaluationSpec],
                       backbones: Mapping[str, str]) -> list[FinetuneResult]:
    """Every result the study declares: ``evaluations`` by id, ``backbones`` maps backbone -> family.

    Each evaluation reads the backbones it runs on (``EvaluationSpec.backbones``, default all of
    ``backbones``). Files for backbones, modes or seeds outside the study are ignored; a declared one
    that is missing is an error, so a partial study is never ranked as if it were whole.
    """
    results = []
    for evaluation, spec in evaluations.items():
        unknown = [b for b in spec.backbones or () if b not in backbones]
        if unknown:
            raise ResultsError(f"evaluation {evaluation!r}: backbones {unknown} are not in the study")
        for backbone in spec.backbones if spec.backbones is not None else backbones:
            family = backbones[backbone]
            for seed in spec.seeds:
                path = result_path(metrics_dir, spec.task, backbone, seed, spec.mode)
                result = read_result(path, record_path(metrics_dir, path), task=spec.task, backbone=backbone,
                                     seed=seed, metric=spec.metric, mode=spec.mode, component=spec.component)
                if result.family != family:
                    raise ResultsError(f"{result.path}: key 'family' is {result.family!r} but the backbone "
                                       f"catalogue in params.yaml says {family!r}")
                results.append(result)
    return results

