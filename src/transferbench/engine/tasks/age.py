"""Age estimation as a softmax over integer ages (PROTOCOL.md, "Age estimation: FG-NET"; paper Table 6).

- Target: the row's ``age`` (an integer in 0..``tasks.<task>.age.max_age``).
- Head: dropout ``finetune.head_dropout`` then one linear layer with one logit per age 0..max_age.
- Loss: cross-entropy (weight 1) plus the mean-variance loss of Pan et al. (CVPR 2018): with p the
  softmax over ages k, m = Σ k·p_k and v = Σ p_k·(k − m)², ``lambda_mean``·½(m − y)² + ``lambda_var``·v,
  each averaged over the batch.
- Prediction: m, the softmax's mean age (not its arg-max).
- Selection: the val MAE (lowest) picks the best epoch and drives the plateau schedule and early
  stopping, as the val loss does for classification.
- Metrics: MAE in years (the paper's), and CS(5), the share of samples within 5 years.
- Figures: predicted against true age on the test split.
- Trivial baseline (the drift gate's learning floor): predicting the training mean age.
- Augmentation (``train_transforms``): random affine with rotation in ±``rotation_degrees`` and an
  x-axis shear in ±``shear_degrees``, random crop, horizontal flip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from transferbench.config import FinetuneSettings, TaskSettings
from transferbench.engine.tasks.base import MetricSpec, TaskKind, register_task_kind
from transferbench.engine.tasks.classification import softmax
from transferbench.errors import DataError

WITHIN_YEARS = 5  # CS(5): the cumulative score at 5 years


def _softmax_moments(logits: torch.Tensor, n_ages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p, m, ages): the softmax over the ages 0..n_ages-1, its mean m per row, and the ages, in float32."""
    # float32 throughout: bf16 steps 0.5 apart between 64 and 128, too coarse for a mean age. Element-wise
    # products and sums (no matmul) stay float32 even inside an autocast region. The ages are made on the
    # logits' device: the loop never moves the loss module.
    logits = logits.float()
    ages = torch.arange(n_ages, dtype=torch.float32, device=logits.device)
    p = logits.softmax(dim=1)
    return p, (p * ages).sum(dim=1), ages


class MeanVarianceLoss(nn.Module):
    """Cross-entropy + ``lambda_mean``·½(m − y)² + ``lambda_var``·v over ages 0..``max_age`` (Pan et al. 2018)."""

    def __init__(self, max_age: int, lambda_mean: float, lambda_var: float) -> None:
        super().__init__()
        self.max_age, self.lambda_mean, self.lambda_var = max_age, lambda_mean, lambda_var

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p, mean, ages = _softmax_moments(logits, self.max_age + 1)
        variance = (p * (ages - mean[:, None]) ** 2).sum(dim=1)
        mean_term = 0.5 * (mean - targets.float()) ** 2
        return (F.cross_entropy(logits.float(), targets) + self.lambda_mean * mean_term.mean()
                + self.lambda_var * variance.mean())


def expected_age(logits: np.ndarray) -> np.ndarray:
    """m, the softmax's mean over the ages 0..n-1, per row of ``logits``."""
    return softmax(logits.astype(np.float64)) @ np.arange(logits.shape[1], dtype=np.float64)


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is one (an int, a whole float, a string of digits), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else None  # NaN (an empty cell) is not
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


@register_task_kind("age")
@dataclass(frozen=True)
class Age(TaskKind):
    max_age: int
    lambda_mean: float
    lambda_var: float
    # Augmentation only: the decoded-image cache is keyed by the kind's repr, and these do not change
    # what it holds.
    rotation_degrees: float = field(default=10.0, repr=False)
    shear_degrees: float = field(default=12.0, repr=False)

    metrics = (MetricSpec("mae", higher_is_better=False), MetricSpec("cs5"))
    selection = MetricSpec("mae", higher_is_better=False)
    train_statistic = "mae"
    target_column = "age"

    @classmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> Age:
        age = task.age
        return cls(age.max_age, age.lambda_mean, age.lambda_var, age.rotation_degrees, age.shear_degrees)

    def describe(self) -> dict[str, Any]:
        return {"max_age": self.max_age, "lambda_mean": self.lambda_mean, "lambda_var": self.lambda_var}

    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> torch.Tensor:
        if self.target_column not in frame.columns:
            raise DataError(f"{manifest}: no '{self.target_column}' column (an age task needs each row's age)")
        out = torch.empty(len(frame), dtype=torch.int64)
        for row, value in enumerate(frame[self.target_column]):
            age = _integer(value)
            if age is None or not 0 <= age <= self.max_age:
                raise DataError(f"{manifest} row {row + 2}: age {value!r} is not an integer in 0..{self.max_age} "
                                f"(tasks.<task>.age.max_age)")
            out[row] = age
        return out

    def head(self, in_features: int, protocol: FinetuneSettings) -> nn.Module:
        return nn.Sequential(nn.Dropout(protocol.head_dropout), nn.Linear(in_features, self.max_age + 1))

    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        return MeanVarianceLoss(self.max_age, self.lambda_mean, self.lambda_var)

    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _, mean, _ = _softmax_moments(outputs.detach(), outputs.shape[1])
        return (mean - targets.float()).abs().sum()

    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        if len(targets) == 0:
            return {"mae": None, "cs5": None}
        errors = np.abs(expected_age(outputs) - targets)
        return {"mae": float(errors.mean()), "cs5": float((errors <= WITHIN_YEARS).mean())}

    def trivial_baseline(self, train_targets: np.ndarray, test_targets: np.ndarray) -> tuple[str, float] | None:
        """The test MAE of predicting every image's age as the training split's mean age."""
        if len(train_targets) == 0 or len(test_targets) == 0:
            return None
        return "training-mean age", float(np.abs(test_targets - train_targets.mean()).mean())

    def train_transforms(self, img_size: int, protocol: FinetuneSettings) -> v2.Transform:
        """The paper's age augmentation on a cached uint8 image, replacing the engine's crop/rotation/flip
        (normalisation follows). The affine runs first, on the larger cached image, so the crop cuts
        away most of the corners it fills."""
        steps: list[v2.Transform] = [
            v2.RandomAffine(degrees=self.rotation_degrees, shear=(-self.shear_degrees, self.shear_degrees)),
            v2.RandomCrop(img_size),
        ]
        if protocol.hflip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps)

    def figures(self, outputs: np.ndarray, targets: np.ndarray, directory: Path, *, title: str,
                images: np.ndarray | None = None) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        predicted = expected_age(outputs)
        mae = float(np.abs(predicted - targets).mean()) if len(targets) else float("nan")
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, self.max_age], [0, self.max_age], color="grey", linewidth=1, label="y = x")
        ax.scatter(targets, predicted, s=14, alpha=0.7)
        ax.set_xlim(0, self.max_age)
        ax.set_ylim(0, self.max_age)
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age m (years)")
        ax.set_title(f"{title}\nMAE {mae:.2f} years", fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = Path(directory) / "age_scatter_test.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]

    def answers(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Per image: the age in years, the softmax's mean over the ages 0..max_age (as evaluation scores it)."""
        return [{"age": float(m)} for m in expected_age(outputs.numpy())]

    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        predicted = expected_age(outputs)
        return pd.DataFrame({"filename": list(filenames), "age": targets, "prediction": predicted,
                             "abs_error": np.abs(predicted - targets)})
