"""What a fine-tune, a sensitivity trial or a registry re-scoring reads: one place that prepares it.

Split manifests -> the task kind (its label space from ``summary.json``) -> the backbone probed
once (a missing or offline weights source fails here, with its message, not inside a Ray worker
where it would be retried) -> timm's input spec (mean, std, crop) -> the decoded image caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transferbench.config import BackboneSettings, DataSettings, FinetuneSettings, TaskSettings
from transferbench.engine.data import SPLITS, TaskManifests, build_cache, read_manifests
from transferbench.engine.tasks import TaskKind, kind_for_task
from transferbench.models import InputSpec, create_backbone, effective_img_size


@dataclass(frozen=True)
class TaskInputs:
    """One (task, backbone)'s prepared inputs."""

    manifests: TaskManifests
    kind: TaskKind
    img_size: int
    spec: InputSpec
    caches: dict[str, Path]  # split -> decoded image cache (absolute path)

    @property
    def cache_side(self) -> int:
        return self.spec.cache_side(self.img_size)


def prepare_inputs(data: DataSettings, task: str, task_settings: TaskSettings, backbone: BackboneSettings,
                   protocol: FinetuneSettings, *, splits: Sequence[str] = SPLITS) -> TaskInputs:
    """Read ``task``'s manifests, probe ``backbone`` and build the image caches of ``splits``."""
    manifests = read_manifests(data.splits_dir, task)
    kind = kind_for_task(task_settings, manifests.summary)
    img_size = effective_img_size(backbone, protocol.img_size)
    spec = InputSpec.of(create_backbone(backbone, img_size=img_size))
    side = spec.cache_side(img_size)
    caches = {s: build_cache(manifests, s, kind=kind, side=side, cache_dir=data.cache_dir).resolve() for s in splits}
    return TaskInputs(manifests, kind, img_size, spec, caches)
