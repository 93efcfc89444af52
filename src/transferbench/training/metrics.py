"""Classification metrics and the figures logged with each run.

Class imbalance is reported, not hidden (issue #4, item 3): accuracy, balanced accuracy,
macro-F1 and, for binary tasks, AUROC (of the positive class, index 1 in summary.json's
sorted class list). Figures use matplotlib's Agg backend (no display needed).
scikit-learn and matplotlib are imported where they are used: the fine-tune stage's driver
imports this module only for ``write_curve_csv`` (scikit-learn alone is ~1 s of its start-up).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from transferbench.data.atomic import atomic_path

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, *, num_classes: int) -> dict[str, float | None]:
    """accuracy, balanced_accuracy, macro_f1 and auroc (binary tasks with both classes present, else None)."""
    from sklearn import metrics as skm

    predictions = logits.argmax(axis=1)
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    out: dict[str, float | None] = {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(skm.f1_score(labels, predictions, average="macro", labels=range(num_classes),
                                       zero_division=0)),
        "auroc": None,
    }
    if num_classes == 2 and len(np.unique(labels)) == 2:
        out["auroc"] = float(skm.roc_auc_score(labels, softmax(logits)[:, 1]))
    return out


def confusion_matrix_figure(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path,
                            *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn import metrics as skm

    matrix = skm.confusion_matrix(labels, logits.argmax(axis=1), labels=range(len(classes)))
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)))
    skm.ConfusionMatrixDisplay(matrix, display_labels=list(classes)).plot(ax=ax, colorbar=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_curve_figure(history: Sequence[Mapping[str, float]], path: Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "val_loss"):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in ("train_accuracy", "val_accuracy"):
        acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
    loss_ax.set_xlabel("epoch"), acc_ax.set_xlabel("epoch")
    loss_ax.legend(), acc_ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr")


def write_curve_csv(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Per-epoch learning curve for ``dvc plots`` (columns CURVE_COLUMNS), written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    return path
