"""The study's results and selection metrics, from its settings (the register and compare stages read them)."""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.engine.tasks import MetricSpec, task_metric
from transferbench.evaluation.results import FinetuneResult, read_study_results


def task_metrics(settings: Settings) -> dict[str, MetricSpec]:
    """Every study task's selection metric and direction, in study order."""
    return {t: task_metric(settings.task(t), key=f"tasks.{t}.metric") for t in settings.study.tasks}


def study_results(settings: Settings) -> list[FinetuneResult]:
    """The study's per-seed fine-tuning results (``compare.metrics_dir``), strictly read."""
    study = settings.study
    return read_study_results(settings.compare.metrics_dir, tasks={t: settings.task(t).metric for t in study.tasks},
                              backbones={b: settings.backbone(b).family for b in study.backbones},
                              seeds=study.seeds)
