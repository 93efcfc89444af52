"""Stage ``finetune_multitask@<task>-<backbone>``: one backbone trained on a multitask task's components at once.

The same fine-tune as ``stages/finetune.py`` (its ``each_seed``: the task's modes and seeds, each its own Ray
Train run, MLflow child run, metrics JSON and learning curve); a stage of its own because a multitask task has
no split: it reads its components' splits, combined by ``engine.inputs``, so dvc.yaml declares different deps.
The metrics JSON adds ``components``: the run's score on each component by that task's own metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from transferbench.config import Settings
from transferbench.errors import TransferbenchError
from transferbench.stages.finetune import each_seed


def each_run(settings: Settings, *, task: str, backbone: str, **options: Any) -> Iterator[dict[str, Any]]:
    """Every seed's metrics JSON of the multitask ``task`` on ``backbone`` (``finetune.each_seed``)."""
    if settings.task(task).kind != "multitask":
        raise TransferbenchError(f"finetune-multitask --task {task}: a {settings.task(task).kind} task, not "
                                 f"multitask; run `transferbench finetune --task {task} --backbone {backbone}`")
    yield from each_seed(settings, task=task, backbone=backbone, **options)
