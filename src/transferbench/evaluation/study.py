"""The study's evaluations, results and selection metrics, from its settings (register and compare read them).

An evaluation is a task in one mode (``evaluation.results.evaluation_id``): every trained task in
each of its modes (``Settings.modes_of``), then every retrieval task, then every component of every
multitask task (``results.component_evaluation_id``: ``<multitask>/<component>``, ranked by the
component's own selection metric, group "multi-task"). Each runs on its task's backbones
(``Settings.backbones_of``).

The registry registers trained models, not columns: one per trained task and mode, and one per
multitask task as a whole, chosen by the multitask task's own selection metric (its summed val loss).
"""

from __future__ import annotations

from collections.abc import Mapping

from transferbench.config import Settings
from transferbench.engine.tasks import MetricSpec, task_metric
from transferbench.evaluation.results import (
    EvaluationSpec,
    FinetuneResult,
    component_evaluation_id,
    evaluation_id,
    read_study_results,
)

# A multitask model is trained whole (the finetune stage runs it in mode full only).
MULTITASK_MODE = "full"
MULTITASK_GROUP = "multi-task"


def _spec(settings: Settings, task: str, mode: str, component: str | None = None) -> EvaluationSpec:
    return EvaluationSpec(task=task, mode=mode, metric=settings.task(component or task).metric,
                          seeds=settings.seeds_of(task), backbones=settings.backbones_of(task), component=component)


def evaluations(settings: Settings) -> dict[str, EvaluationSpec]:
    """The rank table's columns, in study order: trained tasks by mode, retrieval tasks, multitask components."""
    study = settings.study
    out = {evaluation_id(t, m): _spec(settings, t, m) for t in (*study.tasks, *study.retrieval_tasks)
           for m in settings.modes_of(t)}
    for task in study.multitask_tasks:
        out |= {component_evaluation_id(task, c): _spec(settings, task, MULTITASK_MODE, c)
                for c in settings.task(task).components}
    return out


def registered_evaluations(settings: Settings) -> dict[str, EvaluationSpec]:
    """What the registry registers: each trained task in each mode, then each multitask task as a whole."""
    study = settings.study
    return {**{evaluation_id(t, m): _spec(settings, t, m) for t in study.tasks for m in settings.modes_of(t)},
            **{evaluation_id(t, MULTITASK_MODE): _spec(settings, t, MULTITASK_MODE) for t in study.multitask_tasks}}


def evaluation_group(settings: Settings, spec: EvaluationSpec) -> str:
    """The paper's table an evaluation belongs to: linear probes form "linear evaluation", multitask components
    "multi-task"; else the task's group."""
    if spec.component is not None:
        return MULTITASK_GROUP
    if spec.mode == "linear_probe":
        return "linear evaluation"
    return settings.task(spec.task).group or "ungrouped"


def task_metrics(settings: Settings, specs: Mapping[str, EvaluationSpec] | None = None) -> dict[str, MetricSpec]:
    """Each evaluation's selection metric and direction (default: the rank table's evaluations), in order.

    A multitask component's is its component task's (``tasks.<component>.metric``, its kind's direction).
    """
    specs = evaluations(settings) if specs is None else specs
    return {e: task_metric(settings.task(task), key=f"tasks.{task}.metric")
            for e, spec in specs.items() for task in [spec.component or spec.task]}


def study_results(settings: Settings, specs: Mapping[str, EvaluationSpec] | None = None) -> list[FinetuneResult]:
    """The study's per-run results (``compare.metrics_dir``) of ``specs`` (default: every evaluation), strictly read."""
    return read_study_results(settings.compare.metrics_dir,
                              evaluations=evaluations(settings) if specs is None else specs,
                              backbones={b: settings.backbone(b).family for b in settings.study.backbones})
