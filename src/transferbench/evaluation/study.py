"""The study's evaluations, results and selection metrics, from its settings (register and compare read them).

An evaluation is a task in one mode (``evaluation.results.evaluation_id``): every trained task in
each of its modes (``Settings.modes_of``), then every retrieval task.
"""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.engine.tasks import MetricSpec, task_metric
from transferbench.evaluation.results import EvaluationSpec, FinetuneResult, evaluation_id, read_study_results


def evaluations(settings: Settings, *, trained_only: bool = False) -> dict[str, EvaluationSpec]:
    """Every evaluation of the study, in study order (trained tasks by mode, then retrieval tasks)."""
    study = settings.study
    tasks = study.tasks if trained_only else (*study.tasks, *study.retrieval_tasks)
    return {evaluation_id(t, m): EvaluationSpec(task=t, mode=m, metric=settings.task(t).metric,
                                                seeds=settings.seeds_of(t))
            for t in tasks for m in settings.modes_of(t)}


def evaluation_group(settings: Settings, spec: EvaluationSpec) -> str:
    """The paper's table an evaluation belongs to: linear probes form "linear evaluation"; else the task's group."""
    if spec.mode == "linear_probe":
        return "linear evaluation"
    return settings.task(spec.task).group or "ungrouped"


def task_metrics(settings: Settings, *, trained_only: bool = False) -> dict[str, MetricSpec]:
    """Every evaluation's selection metric and direction, in study order."""
    return {e: task_metric(settings.task(spec.task), key=f"tasks.{spec.task}.metric")
            for e, spec in evaluations(settings, trained_only=trained_only).items()}


def study_results(settings: Settings, *, trained_only: bool = False) -> list[FinetuneResult]:
    """The study's per-run results (``compare.metrics_dir``), strictly read."""
    return read_study_results(settings.compare.metrics_dir,
                              evaluations=evaluations(settings, trained_only=trained_only),
                              backbones={b: settings.backbone(b).family for b in settings.study.backbones})
