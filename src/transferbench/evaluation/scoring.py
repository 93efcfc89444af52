"""Score a model loaded back from the MLflow registry exactly as the fine-tuning engine scored it.

The registry's load-back check (issue #6) must reproduce the test metric a run recorded, so it
reuses the engine's own data path rather than a second preprocessing: the decoded-once image
cache (``training.data.build_cache``), the eval transform (centre crop, the backbone's
timm-resolved mean/std, ``models.backbones.InputSpec``), ``training.loop.predict`` and
``training.metrics.classification_metrics``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from transferbench.models.backbones import InputSpec
from transferbench.training import loop
from transferbench.training.data import CachedImages, build_cache, eval_loader, read_manifests
from transferbench.training.metrics import classification_metrics


def score_split(model: torch.nn.Module, *, splits_dir: str | Path, cache_dir: str | Path, task: str, split: str,
                img_size: int, batch_size: int = 64) -> dict[str, float | None]:
    """accuracy, balanced_accuracy, macro_f1 and auroc of ``model`` (a ``Classifier``) on one split."""
    manifests = read_manifests(splits_dir, task)
    spec = InputSpec.of(loop.unwrap(model).backbone)
    cache = build_cache(manifests, split, side=spec.cache_side(img_size), cache_dir=cache_dir)
    dataset = CachedImages(cache, img_size=img_size, mean=spec.mean, std=spec.std, train=False)
    logits, labels, _ = loop.predict(model, eval_loader(dataset, batch_size=batch_size), device=torch.device("cpu"))
    return classification_metrics(logits, labels, num_classes=len(manifests.classes))
