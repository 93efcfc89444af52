"""Score a model loaded back from the MLflow registry exactly as the fine-tuning engine scored it.

The registry's load-back check must reproduce the test metrics a run recorded, so it reuses the
engine's own data path and task kind rather than a second preprocessing: the decoded-once image
cache, the eval transform (centre crop, the backbone's timm-resolved mean/std), ``loop.predict``
and the kind's ``evaluate``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from transferbench.config import TaskSettings
from transferbench.engine import loop
from transferbench.engine.data import CachedImages, build_cache, eval_loader, read_manifests
from transferbench.engine.tasks import kind_for_task
from transferbench.models import InputSpec


def score_split(model: torch.nn.Module, *, task: str, task_settings: TaskSettings, splits_dir: str | Path,
                cache_dir: str | Path, split: str, img_size: int, batch_size: int = 64) -> dict[str, float | None]:
    """Every metric of the task's kind for ``model`` (a ``TaskModel``) on one split."""
    manifests = read_manifests(splits_dir, task)
    kind = kind_for_task(task_settings, manifests.summary)
    spec = InputSpec.of(loop.unwrap(model).backbone)
    cache = build_cache(manifests, split, kind=kind, side=spec.cache_side(img_size), cache_dir=cache_dir)
    dataset = CachedImages(cache, img_size=img_size, mean=spec.mean, std=spec.std, train=False)
    outputs, targets, _ = loop.predict(model, eval_loader(dataset, batch_size=batch_size), device=torch.device("cpu"),
                                       reduce=kind.reduce)
    return kind.evaluate(outputs, targets)
