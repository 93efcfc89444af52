"""Unsupervised retrieval (PROTOCOL.md, "Unsupervised retrieval: Oxford5k"): a kind with no training.

The backbone's own pooled features rank a database for each query (``evaluation.retrieval``, stage
``retrieve``). The kind declares what the rest of the study reads through the seam: its metric (mAP
on the Oxford protocol, higher is better) for the rank table, the drift gate and its learning floor.
Nothing trains it, so the training half of the interface refuses, naming the stage to use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import torch
from torch import nn

from transferbench.config import ConfigError, FinetuneSettings, TaskSettings
from transferbench.engine.tasks.base import MetricSpec, TaskKind, register_task_kind


@register_task_kind("retrieval")
@dataclass(frozen=True)
class Retrieval(TaskKind):
    query: str = "image"

    metrics = (MetricSpec("map"),)
    selection = MetricSpec("map")
    train_statistic = "map"

    @classmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> Retrieval:
        return cls(task.retrieval.query)

    def describe(self) -> dict[str, Any]:
        return {"query": self.query}

    def _untrained(self) -> NoReturn:
        raise ConfigError("a retrieval task trains nothing: run it with `transferbench retrieve` (list it under "
                          "study.retrieval_tasks), not finetune or sensitivity")

    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> torch.Tensor:
        self._untrained()

    def head(self, in_features: int, protocol: FinetuneSettings) -> nn.Module:
        self._untrained()

    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        self._untrained()

    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._untrained()

    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        self._untrained()

    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        self._untrained()
