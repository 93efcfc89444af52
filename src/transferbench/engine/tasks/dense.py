"""Dense prediction: semantic segmentation and depth estimation (PROTOCOL.md, "Dense tasks: NYU Depth V2").

Both read the backbone's feature pyramid (``features = "pyramid"``) through segmentation-models-pytorch's
UPerNet decoder (``models.dense.UPerNetHead``) and train with the iteration-based protocol
(``tasks.<task>.finetune``: AdamW, poly schedule). Targets are per-pixel maps from the manifest's
``mask`` / ``depth`` files, resized with the image (nearest neighbour) into the decoded-image cache and
cropped and flipped with it (``CachedImages``: ``tv_tensors.Mask`` leaves).

Segmentation
- Target: the mask PNG's value v - 1 (classes 0..C-1); v = 0 (unlabelled) becomes ``IGNORE`` (255).
- Loss: per-pixel cross-entropy ignoring ``IGNORE``.
- Metrics: mIoU over the split, as mmsegmentation computes it (per class: intersection / union summed
  over every image; mean over the classes present in the ground truth or the prediction); pixel
  accuracy over the labelled pixels. mIoU selects the best checkpoint.
- Trivial baseline: the majority training class everywhere.

Depth
- Target: the depth PNG in millimetres as metres; 0 (no reading) and values outside
  [``dense.min_depth``, ``dense.max_depth``] are invalid and take no part in loss or metric.
- Head: one channel, ``max_depth`` x sigmoid (a positive depth in range, so the log of the
  scale-invariant loss exists).
- Loss (``dense.depth_loss``): ``silog``, the scale-invariant log loss as BTS trains on NYU:
  10 * sqrt(mean(d^2) - lambda * mean(d)^2) with d = log(pred) - log(gt) over valid pixels; or ``l1``.
- Metrics, per image over its valid pixels, then averaged over the images (the NYU evaluation of
  Eigen et al. and BTS): RMSE (metres; selects, lower is better), AbsRel, and delta1, the share of pixels
  with max(pred / gt, gt / pred) < 1.25.
- Trivial baseline: the mean valid training depth everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2

from transferbench.config import DenseSettings, FinetuneSettings, TaskSettings
from transferbench.engine.tasks.base import MetricSpec, TaskKind, register_task_kind
from transferbench.errors import DataError

IGNORE = 255  # an unlabelled pixel in a segmentation target
DELTA = 1.25
OVERLAYS = 4  # test images in the prediction figure


# --------------------------------------------------------------------------- metrics
def confusion_matrix(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(target class, predicted class) pixel counts over every labelled pixel (target != IGNORE)."""
    valid = target != IGNORE
    t, p = target[valid].astype(np.int64), predicted[valid].astype(np.int64)
    if len(t) and (t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError(f"a class index above {num_classes - 1} in the target or prediction")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: np.ndarray) -> dict[str, float | None]:
    """mIoU (mean over classes present in target or prediction) and pixel accuracy of a confusion matrix."""
    total = matrix.sum()
    if total == 0:
        return {"miou": None, "pixel_accuracy": None}
    hits = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - hits
    present = union > 0
    return {"miou": float((hits[present] / union[present]).mean()), "pixel_accuracy": float(hits.sum() / total)}


def depth_scores(predicted: np.ndarray, target: np.ndarray, *, min_depth: float,
                 max_depth: float) -> dict[str, float | None]:
    """RMSE, AbsRel and delta1 per image over its valid pixels (target finite and in [min_depth, max_depth]),
    averaged over the images that have any; predictions are clamped to the same range."""
    per_image: list[tuple[float, float, float]] = []
    for p, t in zip(predicted, target, strict=True):
        valid = np.isfinite(t) & (t >= min_depth) & (t <= max_depth)
        if not valid.any():
            continue
        p, t = np.clip(p[valid].astype(np.float64), min_depth, max_depth), t[valid].astype(np.float64)
        per_image.append((float(np.sqrt(np.mean((p - t) ** 2))), float(np.mean(np.abs(p - t) / t)),
                          float(np.mean(np.maximum(p / t, t / p) < DELTA))))
    if not per_image:
        return {"rmse": None, "absrel": None, "delta1": None}
    rmse, absrel, delta1 = np.mean(per_image, axis=0)
    return {"rmse": float(rmse), "absrel": float(absrel), "delta1": float(delta1)}


# --------------------------------------------------------------------------- targets
def _fit(path: Path, image: Path, side: int) -> Image.Image:
    """The map resized as its image is (``ImageOps.fit``: centre crop to square, resize), nearest neighbour; a map
    whose size differs from its image's (only the image's header is read) is refused."""
    with Image.open(path) as target, Image.open(image) as source:
        if target.size != source.size:
            raise DataError(f"{path}: size {target.size} differs from its image {image} ({source.size})")
        target.load()
        return ImageOps.fit(target, (side, side), method=Image.Resampling.NEAREST)


def _maps(frame: pd.DataFrame, manifest: Path, column: str, side: int | None) -> list[Image.Image]:
    if column not in frame.columns:
        raise DataError(f"{manifest}: no '{column}' column (a dense task needs each image's {column} file)")
    if side is None:
        raise ValueError("dense targets are maps: targets() needs the cache side")
    out = []
    for row, (path, image) in enumerate(zip(frame[column], frame["filename"], strict=True)):
        try:
            out.append(_fit(Path(path), Path(image), side))
        except (OSError, DataError) as exc:
            raise DataError(f"{manifest} row {row + 2}: cannot use {column} {path}: {exc}") from None
    return out


def mask_targets(frame: pd.DataFrame, manifest: Path, *, side: int | None, num_classes: int) -> torch.Tensor:
    """uint8 (N, side, side): class v - 1 for mask value v in 1..num_classes, ``IGNORE`` for 0."""
    out = torch.empty((len(frame), side or 0, side or 0), dtype=torch.uint8)
    for row, image in enumerate(_maps(frame, manifest, "mask", side)):
        values = np.asarray(image)
        if values.ndim != 2 or values.dtype != np.uint8:
            raise DataError(f"{manifest} row {row + 2}: mask {frame['mask'].iloc[row]} is not an 8-bit "
                            f"single-channel PNG")
        if values.max() > num_classes:
            raise DataError(f"{manifest} row {row + 2}: mask {frame['mask'].iloc[row]} has value {values.max()} "
                            f"above tasks.<task>.dense.num_classes ({num_classes})")
        out[row] = torch.from_numpy(np.where(values == 0, IGNORE, values.astype(np.int64) - 1).astype(np.uint8))
    return out


def depth_targets(frame: pd.DataFrame, manifest: Path, *, side: int | None) -> torch.Tensor:
    """float32 (N, side, side) metres from 16-bit millimetre PNGs; 0 = no reading."""
    out = torch.empty((len(frame), side or 0, side or 0), dtype=torch.float32)
    for row, image in enumerate(_maps(frame, manifest, "depth", side)):
        if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
            raise DataError(f"{manifest} row {row + 2}: depth {frame['depth'].iloc[row]} is not a 16-bit PNG "
                            f"(mode {image.mode}); depths are millimetres, 0 = no reading")
        out[row] = torch.from_numpy(np.asarray(image, dtype=np.float32) / 1000.0)
    return out


# --------------------------------------------------------------------------- losses and heads
class SILogLoss(nn.Module):
    """BTS's scale-invariant log loss over the valid pixels: 10 * sqrt(mean(d^2) - lambda * mean(d)^2)."""

    def __init__(self, variance_focus: float, min_depth: float, max_depth: float) -> None:
        super().__init__()
        self.variance_focus, self.min_depth, self.max_depth = variance_focus, min_depth, max_depth

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target >= self.min_depth) & (target <= self.max_depth)
        if not valid.any():
            return predicted.sum() * 0.0
        d = torch.log(predicted.float().squeeze(1)[valid].clamp_min(self.min_depth)) - torch.log(target[valid])
        return 10.0 * torch.sqrt((d**2).mean() - self.variance_focus * d.mean() ** 2 + 1e-12)


class MaskedL1Loss(nn.Module):
    def __init__(self, min_depth: float, max_depth: float) -> None:
        super().__init__()
        self.min_depth, self.max_depth = min_depth, max_depth

    def forward(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target >= self.min_depth) & (target <= self.max_depth)
        if not valid.any():
            return predicted.sum() * 0.0
        return (predicted.float().squeeze(1)[valid] - target[valid]).abs().mean()


class DepthRange(nn.Module):
    """A positive depth in metres: ``max_depth`` x sigmoid, at least ``min_depth``."""

    def __init__(self, min_depth: float, max_depth: float) -> None:
        super().__init__()
        self.min_depth, self.max_depth = min_depth, max_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(x.float()) * self.max_depth).clamp_min(self.min_depth)


def dense_train_transforms(img_size: int, protocol: FinetuneSettings) -> v2.Transform:
    """Random crop and horizontal flip (PROTOCOL.md's dense augmentation), applied to image and maps alike."""
    steps: list[v2.Transform] = [v2.RandomCrop(img_size)]
    if protocol.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _overlay_figure(images: np.ndarray | None, panels: Sequence[tuple[str, np.ndarray, dict[str, Any]]],
                    path: Path, *, title: str) -> Path | None:
    """Rows: test images; columns: the image, then each (name, maps, imshow keywords) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(OVERLAYS, len(panels[0][1]))
    if rows == 0:
        return None
    columns = len(panels) + (images is not None)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for r in range(rows):
        c = 0
        if images is not None:
            axes[r][0].imshow(np.transpose(images[r], (1, 2, 0)))
            axes[r][0].set_title("image" if r == 0 else "", fontsize=8)
            c = 1
        for name, maps, style in panels:
            axes[r][c].imshow(maps[r], interpolation="nearest", **style)
            axes[r][c].set_title(name if r == 0 else "", fontsize=8)
            c += 1
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class _Dense(TaskKind):
    dense: DenseSettings

    features = "pyramid"
    dense_targets = True

    @classmethod
    def for_task(cls, task: TaskSettings, summary: Mapping[str, Any]) -> _Dense:
        return cls(task.dense)

    def train_transforms(self, img_size: int, protocol: FinetuneSettings) -> v2.Transform:
        return dense_train_transforms(img_size, protocol)

    def batch_augmentation(self, protocol: FinetuneSettings) -> tuple[float, bool] | None:
        return 0.0, protocol.hflip  # dense_train_transforms: crop and flip, no rotation


@register_task_kind("segmentation")
@dataclass(frozen=True)
class Segmentation(_Dense):
    metrics = (MetricSpec("miou"), MetricSpec("pixel_accuracy"))
    selection = MetricSpec("miou")
    train_statistic = "pixel_accuracy"
    target_column = "mask"

    def describe(self) -> dict[str, Any]:
        return {"num_classes": self.dense.num_classes, "decoder_channels": self.dense.decoder_channels,
                "head": "UPerNet (segmentation-models-pytorch)"}

    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> torch.Tensor:
        return mask_targets(frame, manifest, side=side, num_classes=self.dense.num_classes)

    def head(self, in_features: Any, protocol: FinetuneSettings) -> nn.Module:
        from transferbench.models.dense import UPerNetHead

        return UPerNetHead(in_features, self.dense.num_classes, decoder_channels=self.dense.decoder_channels)

    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        return _MaskCrossEntropy()

    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per image: the share of its labelled pixels predicted right (summed over the batch)."""
        valid = targets != IGNORE
        hits = ((outputs.detach().argmax(1) == targets.long()) & valid).flatten(1).sum(1)
        return (hits / valid.flatten(1).sum(1).clamp_min(1)).sum()

    def reduce(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(1).to(torch.uint8)

    def answers(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Per image: the mask of class indices (H, W), index c for the dataset's mask value c + 1."""
        return [{"mask": mask.numpy()} for mask in self.reduce(outputs)]

    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        return segmentation_scores(confusion_matrix(outputs, targets, self.dense.num_classes))

    def trivial_baseline(self, train_targets: np.ndarray, test_targets: np.ndarray) -> tuple[str, float] | None:
        labelled = train_targets[train_targets != IGNORE]
        if not labelled.size or not test_targets.size:
            return None
        majority = int(np.bincount(labelled.astype(np.int64)).argmax())
        score = self.evaluate(np.full_like(test_targets, majority), test_targets)["miou"]
        return None if score is None else ("majority-class mask", score)

    def figures(self, outputs: np.ndarray, targets: np.ndarray, directory: Path, *, title: str,
                images: np.ndarray | None = None) -> list[Path]:
        style = {"cmap": "tab20", "vmin": 0, "vmax": self.dense.num_classes - 1}
        shown = np.ma.masked_equal(targets[:OVERLAYS], IGNORE)
        path = _overlay_figure(images, [("ground truth", shown, style), ("prediction", outputs[:OVERLAYS], style)],
                               Path(directory) / "segmentation_test.png", title=title)
        return [path] if path else []

    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        rows = []
        for name, p, t in zip(filenames, outputs, targets, strict=True):
            scores = self.evaluate(p[None], t[None])
            rows.append({"filename": name, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]})
        return pd.DataFrame(rows, columns=["filename", "miou", "pixel_accuracy"])


class _MaskCrossEntropy(nn.Module):
    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.long()
        if not (targets != IGNORE).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)


@register_task_kind("depth")
@dataclass(frozen=True)
class Depth(_Dense):
    metrics = (MetricSpec("rmse", higher_is_better=False), MetricSpec("absrel", higher_is_better=False),
               MetricSpec("delta1"))
    selection = MetricSpec("rmse", higher_is_better=False)
    train_statistic = "absrel"
    target_column = "depth"

    def describe(self) -> dict[str, Any]:
        d = self.dense
        return {"depth_loss": d.depth_loss, "silog_lambda": d.silog_lambda, "min_depth": d.min_depth,
                "max_depth": d.max_depth, "decoder_channels": d.decoder_channels,
                "head": "UPerNet (segmentation-models-pytorch), 1 channel, max_depth x sigmoid"}

    def targets(self, frame: pd.DataFrame, manifest: Path, *, side: int | None = None) -> torch.Tensor:
        return depth_targets(frame, manifest, side=side)

    def head(self, in_features: Any, protocol: FinetuneSettings) -> nn.Module:
        from transferbench.models.dense import UPerNetHead

        return UPerNetHead(in_features, 1, decoder_channels=self.dense.decoder_channels,
                           activation=DepthRange(self.dense.min_depth, self.dense.max_depth))

    def loss(self, protocol: FinetuneSettings) -> nn.Module:
        d = self.dense
        if d.depth_loss == "l1":
            return MaskedL1Loss(d.min_depth, d.max_depth)
        return SILogLoss(d.silog_lambda, d.min_depth, d.max_depth)

    def _valid(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets >= self.dense.min_depth) & (targets <= self.dense.max_depth)

    def statistic(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per image: AbsRel over its valid pixels (summed over the batch)."""
        valid = self._valid(targets)
        relative = (outputs.detach().float().squeeze(1) - targets).abs() / targets.clamp_min(self.dense.min_depth)
        return ((relative * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)).sum()

    def reduce(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().squeeze(1)

    def answers(self, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """Per image: the depth map (H, W) in metres, within [min_depth, max_depth]."""
        return [{"depth": depth.numpy()} for depth in self.reduce(outputs)]

    def evaluate(self, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float | None]:
        return depth_scores(outputs, targets, min_depth=self.dense.min_depth, max_depth=self.dense.max_depth)

    def trivial_baseline(self, train_targets: np.ndarray, test_targets: np.ndarray) -> tuple[str, float] | None:
        d = self.dense
        valid = train_targets[(train_targets >= d.min_depth) & (train_targets <= d.max_depth)]
        if not valid.size or not test_targets.size:
            return None
        score = self.evaluate(np.full_like(test_targets, valid.mean()), test_targets)["rmse"]
        return None if score is None else ("mean training depth", score)

    def figures(self, outputs: np.ndarray, targets: np.ndarray, directory: Path, *, title: str,
                images: np.ndarray | None = None) -> list[Path]:
        style = {"cmap": "viridis_r", "vmin": 0.0, "vmax": float(np.nanmax(targets[:OVERLAYS], initial=1.0))}
        shown = np.ma.masked_where(~((targets >= self.dense.min_depth) & (targets <= self.dense.max_depth)), targets)
        path = _overlay_figure(images, [("ground truth (m)", shown[:OVERLAYS], style),
                                        ("prediction (m)", outputs[:OVERLAYS], style)],
                               Path(directory) / "depth_test.png", title=title)
        return [path] if path else []

    def prediction_table(self, filenames: Sequence[str], outputs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
        rows = []
        for name, p, t in zip(filenames, outputs, targets, strict=True):
            rows.append({"filename": name, **self.evaluate(p[None], t[None])})
        return pd.DataFrame(rows, columns=["filename", "rmse", "absrel", "delta1"])
