"""What a fine-tune, a sensitivity trial or a registry re-scoring reads: one place that prepares it.

Split manifests -> the task kind (its label space from ``summary.json``) -> the backbone probed
once (a missing or offline weights source fails here, with its message, not inside a Ray worker
where it would be retried) -> timm's input spec (mean, std, crop) -> the decoded image caches.

A multitask task has no split of its own: ``combine_manifests`` writes its manifests from its
components' (under ``<cache_dir>/<task>/manifests``, derived data): components on the same dataset and
split share their rows (one domain), components on different datasets are stacked, each row marked
with its ``domain``; its ``summary.json`` carries each component's settings and split summary. A
component's settings are the ones its split recorded (and must equal params'): the multitask stage
depends on the components' split outputs, not on every task's params.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transferbench import atomic
from transferbench.config import BackboneSettings, DataSettings, FinetuneSettings, TaskSettings
from transferbench.engine.data import SPLITS, TaskManifests, build_cache, read_manifests
from transferbench.errors import DataError
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


DOMAIN = "domain"


def combine_manifests(data: DataSettings, task: str, components: Mapping[str, TaskSettings]) -> TaskManifests:
    """The multitask ``task``'s manifests from its ``components``' splits (see the module docstring)."""
    domains: dict[str, int] = {}  # (dataset, split) -> domain
    parts: dict[int, TaskManifests] = {}
    entries = []
    for name, settings in components.items():
        manifests = read_manifests(data.splits_dir, name)
        recorded = manifests.summary.get("settings")
        if recorded != settings.model_dump(mode="json"):
            raise DataError(f"multitask {task!r}: tasks.{name} in params differs from the settings its split was made "
                            f"with ({manifests.paths['train'].parent / 'summary.json'}); rerun its split: "
                            f"`dvc repro split@{name}` (or `transferbench split {name}`)")
        key = json.dumps({"dataset": settings.dataset, "split": settings.split.model_dump() if settings.split else
                          None, "options": settings.options.model_dump()}, sort_keys=True, default=str)
        domain = domains.setdefault(key, len(domains))
        if domain in parts and any(list(parts[domain].frame(s)["filename"]) != list(manifests.frame(s)["filename"])
                                   for s in SPLITS):
            raise DataError(f"multitask {task!r}: components on the same dataset and split must share their images, "
                            f"but {name!r}'s manifests differ from its domain's first component; rerun their split")
        parts.setdefault(domain, manifests)
        entries.append({"name": name, "kind": settings.kind, "domain": domain, "settings": recorded,
                        "summary": manifests.summary})
    mixed = len(parts) > 1
    summary = {"task": task, "components": entries, "mixed": mixed,
               "routed": mixed and all(e["kind"] == "classification" for e in entries)}
    root = Path(data.cache_dir) / task / "manifests"
    paths = {split: root / f"{split}.csv" for split in SPLITS}
    for split in SPLITS:
        frame = pd.concat([m.frame(split).assign(**{DOMAIN: d}) for d, m in sorted(parts.items())],
                          ignore_index=True)
        atomic.write_csv(paths[split], frame)
    atomic.write_json(root / "summary.json", summary)
    return TaskManifests(task, paths, summary)


def prepare_inputs(data: DataSettings, task: str, task_settings: TaskSettings, backbone: BackboneSettings,
                   protocol: FinetuneSettings, *, splits: Sequence[str] = SPLITS,
                   components: Mapping[str, TaskSettings] | None = None) -> TaskInputs:
    """Read ``task``'s manifests (a multitask task's: combined from its ``components``' settings), probe
    ``backbone`` and build the image caches of ``splits``."""
    if task_settings.kind == "multitask":
        if components is None:
            raise ValueError(f"multitask {task!r}: prepare_inputs needs its components' settings")
        manifests = combine_manifests(data, task, components)
    else:
        manifests = read_manifests(data.splits_dir, task)
    kind = kind_for_task(task_settings, manifests.summary)
    img_size = effective_img_size(backbone, protocol.img_size)
    spec = InputSpec.of(create_backbone(backbone, img_size=img_size))
    side = spec.cache_side(img_size)
    caches = {s: build_cache(manifests, s, kind=kind, side=side, cache_dir=data.cache_dir).resolve() for s in splits}
    return TaskInputs(manifests, kind, img_size, spec, caches)
