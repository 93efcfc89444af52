"""A run's learning curve: the CSV ``dvc plots`` reads, and the figure logged to MLflow.

The columns are the loop's per-epoch record: loss, the task kind's training statistic (e.g.
``train_accuracy``) and its val counterpart, and the learning rate. matplotlib is imported where
it is used (Agg backend, no display needed).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from transferbench.atomic import atomic_path


def curve_path(plots_dir: str | Path, task: str, backbone: str, seed: int, mode: str, weights_label: str) -> Path:
    """A run's learning curve; its name says the seed and the weights (``curve_seed`` reads the seed back)."""
    return Path(plots_dir) / task / backbone / mode / f"seed{seed}-{weights_label}.csv"


def curve_seed(path: str | Path) -> int:
    """The seed of a learning curve's file (``curve_path``)."""
    return int(Path(path).stem.removeprefix("seed").split("-", 1)[0])


def curve_columns(statistic: str) -> tuple[str, ...]:
    return ("epoch", "step", "train_loss", "val_loss", f"train_{statistic}", f"val_{statistic}", "lr")


def write_curve_csv(history: Sequence[Mapping[str, float]], path: Path, *, statistic: str) -> Path:
    """Per-epoch learning curve for ``dvc plots`` (``curve_columns``), written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=curve_columns(statistic), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    return path


def learning_curve_figure(history: Sequence[Mapping[str, float]], path: Path, *, statistic: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, stat_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train_loss", "val_loss"):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
    for key in (f"train_{statistic}", f"val_{statistic}"):
        stat_ax.plot(epochs, [h[key] for h in history], marker="o", label=key)
    loss_ax.set_xlabel("epoch"), stat_ax.set_xlabel("epoch")
    loss_ax.legend(), stat_ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
