"""Stage ``finetune@<task>-<backbone>``: train one backbone on one task, once per mode and seed.

Builds the pieces and calls them: the task's inputs (manifests, task kind, the probed backbone,
the image caches; a multitask task's combined from its components'), the MLflow run registry, then one
Ray Train run per training mode (``full``,
``linear_probe``: the task's modes, else ``study.modes``) and seed (``engine.finetune.run_seed``:
its own MLflow child run, metrics JSON and learning curve). The runs go one after another in this
process, so its start-up (importing torch, timm, MLflow and Ray Train) is paid once per stage.
The task's protocol is ``finetune`` with its own values over it (``Settings.finetune_for``). A study
backbone the task does not list (``tasks.<task>.backbones``) gets no run: the stage leaves a note.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transferbench.config import ConfigError, RaySettings, Settings, build
from transferbench.engine.finetune import Job, run_seed
from transferbench.engine.inputs import prepare_inputs
from transferbench.engine.tasks import task_metric
from transferbench.engine.tracking import RunRegistry
from transferbench.errors import TransferbenchError
from transferbench.stages.skipped import write_skipped


def job_for(settings: Settings, task: str, backbone: str, *, num_workers: int | None = None,
            mode: str = "full") -> Job:
    """The (task, backbone, mode)'s sections; ``num_workers`` overrides ``ray.num_workers`` (``--workers``)."""
    task_settings = settings.task(task)
    if task_settings.kind == "retrieval":
        raise TransferbenchError(f"finetune --task {task}: a retrieval task trains nothing; run `transferbench "
                                 f"retrieve --task {task} --backbone {backbone}` (stage retrieve@{task}-{backbone})")
    task_metric(task_settings, key=f"tasks.{task}.metric")  # a metric the task's kind does not have fails here
    ray = settings.ray
    if num_workers is not None:  # N workers (elastic down to min(min_workers, N) if set); 0: local mode
        floor = None if ray.min_workers is None or num_workers == 0 else min(ray.min_workers, num_workers)
        try:
            ray = build(RaySettings, {**ray.model_dump(), "num_workers": num_workers, "min_workers": floor})
        except ConfigError as exc:
            raise TransferbenchError(f"--workers {num_workers}: {exc}") from None
    protocol = settings.finetune_for(backbone, task).model_copy(update={"mode": mode})
    return Job(study=settings.study.name, task=task, task_settings=task_settings, backbone_name=backbone,
               backbone=settings.backbone(backbone), protocol=protocol, ray=ray, tracking=settings.tracking)


def each_seed(settings: Settings, *, task: str, backbone: str, seeds: Sequence[int] = (),
              modes: Sequence[str] = (), num_workers: int | None = None, metrics_dir: str | Path | None = None,
              plots_dir: str | Path = "plots/finetune", fresh: bool = False) -> Iterator[dict[str, Any]]:
    """Train every mode x seed (default: the task's, ``Settings.modes_of``/``seeds_of``), yielding each run's
    metrics JSON when it is done."""
    if not settings.runs_on(task, backbone):  # the task lists its own backbones: no run on this one
        settings.backbone(backbone)
        write_skipped(settings, task=task, backbone=backbone, metrics_dir=metrics_dir, plots_dir=plots_dir)
        return
    registry = RunRegistry.from_settings(settings.tracking)
    inputs = None
    task_settings = settings.task(task)
    components = {c: settings.task(c) for c in task_settings.components} or None
    for mode in modes or settings.modes_of(task):
        job = job_for(settings, task, backbone, num_workers=num_workers, mode=mode)
        if inputs is None:  # the modes share the task's inputs (manifests, image caches)
            inputs = prepare_inputs(settings.data, task, job.task_settings, job.backbone, job.protocol,
                                    components=components)
        for seed in seeds or settings.seeds_of(task):
            yield run_seed(job, inputs, registry, seed=seed, metrics_dir=metrics_dir or settings.compare.metrics_dir,
                           plots_dir=plots_dir, fresh=fresh)


def run(settings: Settings, *, task: str, backbone: str, **options: Any) -> list[dict[str, Any]]:
    """Every seed's metrics JSON (``each_seed``, run to the end)."""
    return list(each_seed(settings, task=task, backbone=backbone, **options))


def run_finetune(settings: Settings, *, task: str, backbone: str, seed: int, mode: str = "full",
                 **options: Any) -> dict[str, Any]:
    """One run (``run`` with ``seeds=[seed]``, ``modes=[mode]``)."""
    (result,) = run(settings, task=task, backbone=backbone, seeds=[seed], modes=[mode], **options)
    return result
