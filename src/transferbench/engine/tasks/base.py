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


class TaskKind(ABC):
    """One kind of downstream task. Instances are frozen values (they travel to Ray workers)."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[MetricSpec, ...]]  # reported on val and test, in this order
    selection: ClassVar[MetricSpec]  # val_<name> picks the best epoch (and drives the schedule)
    train_statistic: ClassVar[str]  # per-epoch mean over training samples of ``statistic``
    target_column: ClassVar[str | None] = None  # the manifest column targets come from (MLflow dataset inputs)

    @classmethod
    @abstractmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> TaskKind:
        """The kind for one task, from its split stage's ``summary.json`` (e.g. its classes)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The label space as MLflow params (e.g. ``num_classes``, ``classes``)."""

    @abstractmethod
    def targets(self, frame: pd.DataFrame, manifest: Path) -> torch.Tensor:
        """One target per manifest row; an unusable row raises ``DataError`` naming the file and row."""

    @abstractmethod
    def head(self, in_features: int, protocol: FinetuneSettings) -> nn.Module:
        """The head on the backbone's pooled features."""

    @abstractmethod
    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        """The training loss (also the val loss)."""

    @abstractmethod
    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch's ``train_statistic``, summed over its samples (kept on the device)."""

    @abstractmethod
    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        """Every metric of ``metrics`` on one split's outputs (None where undefined)."""

    def figures(self, outputs: np.ndarray, targets: np.ndarray, directory: Path, *, title: str) -> list[Path]:
        """Kind-specific figures of the test split, written under ``directory``."""
        return []

    def train_transforms(self, img_size: int, protocol: FinetuneSettings) -> Any:
        """The kind's own training augmentation on uint8 images (a torchvision v2 transform ending in an
        ``img_size`` crop), or None: the protocol's random crop, rotation and flip."""
        return None

    def trivial_baseline(self, train_targets: np.ndarray, test_targets: np.ndarray) -> tuple[str, float] | None:
        """(what it is, its test value of the selection metric) for a predictor that ignores the image, e.g.
        predicting the training mean; the drift gate's ``trivial`` learning floor. None: the kind has none."""
        return None

    @abstractmethod
    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        """One row per sample: what it was and what the model said."""

    def optimizer(self, parameters: Iterable[nn.Parameter], protocol: FinetuneSettings) -> torch.optim.Optimizer:
        """The paper's Adam (betas, weight decay from the protocol), at ``protocol.lr``."""
        return torch.optim.Adam(parameters, lr=protocol.lr, betas=tuple(protocol.adam_betas),
                                weight_decay=protocol.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer,
                  protocol: FinetuneSettings) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
        """The paper's schedule: lr times ``plateau_factor`` when the selection metric stalls
        ``plateau_patience`` epochs."""
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
