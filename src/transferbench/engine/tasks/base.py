"""The task-kind interface and its registry (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from transferbench.config import ConfigError, FinetuneSettings, TaskSettings


@dataclass(frozen=True)
class MetricSpec:
    """A metric's name and direction; ranks, the registry, the gate and Optuna read the direction here."""

    name: str
    higher_is_better: bool = True

    def better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class PolyFactor:
    """lr / ``lr`` at iteration t, as mmsegmentation's poly schedule with linear warm-up:
    (1 - t / max_iters)^power, times 1 - (1 - t / warmup_iters)(1 - warmup_lr / lr) during the warm-up
    (so t = 0 starts at warmup_lr). A picklable value: the scheduler's state holds no closure."""

    lr: float
    warmup_lr: float
    warmup_iters: int
    max_iters: int
    power: float

    def __call__(self, step: int) -> float:
        factor = (1.0 - min(step, self.max_iters) / self.max_iters) ** self.power
        if step < self.warmup_iters:
            factor *= 1.0 - (1.0 - step / self.warmup_iters) * (1.0 - self.warmup_lr / self.lr)
        return factor


class TaskKind(ABC):
    """One kind of downstream task. Instances are frozen values (they travel to Ray workers)."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[MetricSpec, ...]]  # reported on val and test, in this order
    selection: ClassVar[MetricSpec]  # val_<name> picks the best epoch (and drives the schedule)
    train_statistic: ClassVar[str]  # per-epoch mean over training samples of ``statistic``
    target_column: ClassVar[str | None] = None  # the manifest column targets come from (MLflow dataset inputs)
    # What the head reads: "pooled" (the backbone's pooled features, an int) or "pyramid" (its multi-scale
    # features, ``models.dense``: the head gets the channels of each level).
    features: ClassVar[str] = "pooled"
    # Targets are per-pixel maps: cropped and flipped with their image (``tv_tensors.Mask`` in ``CachedImages``).
    dense_targets: ClassVar[bool] = False
    # A step may leave some of the model's parameters without a gradient (a multi-task batch with no image of one
    # head's dataset): DDP must be told to tolerate it.
    unused_parameters: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> TaskKind:
        """The kind for one task, from its split stage's ``summary.json`` (e.g. its classes)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The label space as MLflow params (e.g. ``num_classes``, ``classes``)."""

    @abstractmethod
    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> Any:
        """One target per manifest row (a tensor, or a dict of tensors, batch first); an unusable row raises
        ``DataError`` naming the file and row. ``side``: the cached images' side, which dense maps are resized to."""

    @abstractmethod
    def head(self, in_features: Any, protocol: FinetuneSettings) -> nn.Module:
        """The head on the backbone's features: pooled (``in_features`` is their size) or a pyramid (the
        channels of each level), as ``features`` says."""

    @abstractmethod
    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        """The training loss (also the val loss)."""

    @abstractmethod
    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's ``train_statistic``, summed over its samples (kept on the device)."""

    @abstractmethod
    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        """Every metric of ``metrics`` on one split's outputs (None where undefined)."""

    def reduce(self, outputs: Any) -> Any:
        """What evaluation keeps of a batch's outputs, on the device (e.g. a dense kind's arg-max mask instead of
        its per-class logits, so a split's outputs fit in memory); ``evaluate`` and ``figures`` receive it."""
        return outputs

    def figures(self, outputs: Any, targets: Any, directory: Path, *, title: str,
                images: np.ndarray | None = None) -> list[Path]:
        """Kind-specific figures of the test split, written under ``directory``; ``images``: the first test images
        as uint8 (N, 3, H, W), for figures that overlay predictions on them."""
        return []

    def train_transforms(self, img_size: int, protocol: FinetuneSettings) -> Any:
        """The kind's own training augmentation on uint8 images (a torchvision v2 transform ending in an
        ``img_size`` crop), or None: the protocol's random crop, rotation and flip."""
        return None

    def batch_augmentation(self, protocol: FinetuneSettings) -> tuple[float, bool] | None:
        """(rotation in degrees, flip) of the batched crop/rotation/flip (``engine.augment``) that stands for
        ``train_transforms`` on the training device; None: the kind's augmentation has no batched form, and
        runs per sample on the CPU."""
        if self.train_transforms(protocol.img_size, protocol) is not None:
            return None
        return protocol.rotation_degrees, protocol.hflip

    def trivial_baseline(self, train_targets: np.ndarray, test_targets: np.ndarray) -> tuple[str, float] | None:
        """(what it is, its test value of the selection metric) for a predictor that ignores the image, e.g.
        predicting the training mean; the drift gate's ``trivial`` learning floor. None: the kind has none."""
        return None

    def result_fields(self, final: Mapping[str, Any]) -> dict[str, Any]:
        """What the kind adds to a run's metrics JSON from its final ``val_``/``test_`` scores (e.g. a multi-task
        run's score on each component)."""
        return {}

    def answers(self, outputs: Any) -> list[dict[str, Any]]:
        """The served model's answer to each image of a batch, from the model's outputs on the CPU (a tensor, or a
        dict of tensors): what a user asks the task for, e.g. a class name and the class probabilities, an age in
        years, a mask or a depth map (``engine.serving``)."""
        raise NotImplementedError(f"task kind {self.name!r} has no served answer")

    @abstractmethod
    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        """One row per sample: what it was and what the model said."""

    def optimizer(self, parameters: Iterable[nn.Parameter], protocol: FinetuneSettings) -> torch.optim.Optimizer:
        """The protocol's optimiser at ``protocol.lr``: the paper's Adam, or AdamW (the dense tasks'), with the
        protocol's betas and weight decay."""
        optimizer = torch.optim.AdamW if protocol.optimizer == "adamw" else torch.optim.Adam
        return optimizer(parameters, lr=protocol.lr, betas=tuple(protocol.adam_betas),
                         weight_decay=protocol.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer,
                  protocol: FinetuneSettings) -> torch.optim.lr_scheduler.LRScheduler:
        """The protocol's schedule. ``plateau``: lr times ``plateau_factor`` when the selection metric stalls
        ``plateau_patience`` epochs (stepped per epoch with the val score). ``poly``: per iteration,
        ``poly_factor`` (stepped after every optimiser step)."""
        if protocol.schedule == "poly":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyFactor(protocol.lr, protocol.warmup_lr,
                                                                           protocol.warmup_iters,
                                                                           protocol.max_iters, protocol.poly_power))
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if self.selection.higher_is_better else "min", factor=protocol.plateau_factor,
            patience=protocol.plateau_patience)

    @classmethod
    def metric(cls, name: str, *, key: str = "metric") -> MetricSpec:
        """The spec of metric ``name`` (``val_``/``test_`` prefixes allowed); ``ConfigError`` naming ``key`` if the
        kind has no such metric."""
        bare = name.removeprefix("val_").removeprefix("test_")
        for spec in (*cls.metrics, cls.selection):
            if spec.name == bare:
                return spec
        raise ConfigError(f"params key '{key}': {name!r} is not a metric of task kind {cls.name!r}; "
                          f"allowed values: {', '.join(s.name for s in cls.metrics)}")


_KINDS: dict[str, type[TaskKind]] = {}
K = TypeVar("K", bound=type[TaskKind])


def register_task_kind(name: str) -> Callable[[K], K]:
    """Class decorator: register a ``TaskKind`` under ``name`` (the value of ``tasks.<task>.kind``)."""

    def register(cls: K) -> K:
        if name in _KINDS:
            raise ValueError(f"task kind {name!r} registered twice")
        cls.name = name
        _KINDS[name] = cls
        return cls

    return register


def list_task_kinds() -> list[str]:
    return sorted(_KINDS)


def get_task_kind(name: str) -> type[TaskKind]:
    if name not in _KINDS:
        raise ConfigError(f"unknown task kind {name!r}; registered kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def kind_for_task(task: TaskSettings, summary: Mapping[str, Any]) -> TaskKind:
    return get_task_kind(task.kind).for_task(task, summary)


def task_metric(task: TaskSettings, *, key: str = "metric") -> MetricSpec:
    """The task's selection metric (``tasks.<task>.metric``) with the direction its kind declares; ``ConfigError``
    naming ``key`` when the kind has no such metric."""
    return get_task_kind(task.kind).metric(task.metric, key=key)
