"""Single-label image classification (PROTOCOL.md, "Fine-tuning protocol (classification)").

- Target: the index of the row's ``label`` in the task's sorted class list (``summary.json``).
- Head: dropout ``finetune.head_dropout`` then one linear layer.
- Loss: cross-entropy with label smoothing ``finetune.label_smoothing``.
- Selection: the val loss (lowest) picks the best epoch and drives the plateau schedule and early
  stopping, as the paper's protocol says.
- Metrics (class imbalance reported, not hidden): accuracy, balanced accuracy, macro-F1 and, for
  binary tasks with both classes present, AUROC of the positive class (index 1).
- Figures: the test confusion matrix. scikit-learn and matplotlib are imported where used.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from transferbench.config import FinetuneSettings, TaskSettings
from transferbench.engine.tasks.base import MetricSpec, TaskKind, register_task_kind
from transferbench.errors import DataError


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


@register_task_kind("classification")
@dataclass(frozen=True)
class Classification(TaskKind):
    classes: tuple[str, ...]

    metrics = (MetricSpec("accuracy"), MetricSpec("balanced_accuracy"), MetricSpec("macro_f1"), MetricSpec("auroc"))
    selection = MetricSpec("loss", higher_is_better=False)
    train_statistic = "accuracy"
    target_column = "label"

    @classmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> Classification:
        classes = tuple(summary.get("classes", ()))
        if len(classes) < 2:
            raise DataError(f"task {task.dataset!r}: summary.json must list at least two 'classes', got {list(classes)}")
        return cls(classes)

    def describe(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "classes": ",".join(self.classes)}

    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.classes)}
        out = torch.empty(len(frame), dtype=torch.int64)
        for row, label in enumerate(frame["label"]):
            if label not in index:
                raise DataError(f"{manifest} row {row + 2}: label {label!r} is not one of the classes in "
                                f"summary.json {list(self.classes)}")
            out[row] = index[label]
        return out

    def head(self, in_features: int, protocol: FinetuneSettings) -> nn.Module:
        return nn.Sequential(nn.Dropout(protocol.head_dropout), nn.Linear(in_features, len(self.classes)))

    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=protocol.label_smoothing)

    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(1) == targets).sum()

    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        from sklearn import metrics as skm

        predictions = outputs.argmax(axis=1)
        n = len(self.classes)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out: dict[str, float | None] = {
            "accuracy": float(skm.accuracy_score(targets, predictions)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(targets, predictions)),
            "macro_f1": float(skm.f1_score(targets, predictions, average="macro", labels=range(n), zero_division=0)),
            "auroc": None,
        }
        if n == 2 and len(np.unique(targets)) == 2:
            out["auroc"] = float(skm.roc_auc_score(targets, softmax(outputs)[:, 1]))
        return out

    def figures(self, outputs: np.ndarray, targets: np.ndarray, directory: Path, *, title: str,
                images: np.ndarray | None = None) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn import metrics as skm

        n = len(self.classes)
        matrix = skm.confusion_matrix(targets, outputs.argmax(axis=1), labels=range(n))
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
        skm.ConfusionMatrixDisplay(matrix, display_labels=list(self.classes)).plot(ax=ax, colorbar=False)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = Path(directory) / "confusion_matrix_test.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]

    def answers(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Per image: the most probable class, its probability, and every class's probability in class order."""
        rows = []
        for p in softmax(outputs.double().numpy()):
            best = int(p.argmax())
            rows.append({"label": self.classes[best], "probability": float(p[best]),
                         "probabilities": {name: float(v) for name, v in zip(self.classes, p, strict=True)}})
        return rows

    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        names = np.asarray(self.classes)
        return pd.DataFrame({"filename": list(filenames), "label": names[targets],
                             "prediction": names[outputs.argmax(axis=1)]})
