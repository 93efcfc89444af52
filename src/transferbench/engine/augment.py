"""The protocol's training augmentation as one batched operation on the training device (PROTOCOL.md,
"Augmentation": random crop, random rotation in [-d, d] degrees, horizontal flip).

``CachedImages`` can do the same per sample with torchvision on the CPU, in the DataLoader; that path
costs CPU time per image that a GPU step no longer hides, and its loader processes keep their own
random streams. Here the uint8 batch (B, 3, S, S) of the cache goes to the device as is, and each
sample's crop, rotation and flip are composed into one affine matrix, applied by a single
``affine_grid`` + ``grid_sample`` to the batch: bilinear for the image, nearest neighbour for per-pixel
targets (segmentation masks, depth maps), which therefore keep exactly their values, as
``tv_tensors.Mask`` does on the CPU path.

The geometry is the CPU path's: crop ``img_size`` at (top, left) of the S-px cached image, rotate that
crop about its centre, flip it. Points that the rotation brings in from outside the crop are filled
with 0 (before normalisation), as torchvision's ``RandomRotation`` fills the corners of a rotated
crop, even where the cached image has pixels there.

Parameters come from a seeded ``torch.Generator`` on the CPU (a few numbers per sample), so the same
seed gives the same augmentation on any device; ``loop.fit`` seeds it from (seed, epoch, rank), and a
resumed run replays an uninterrupted one's augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from transferbench.config import FinetuneSettings
    from transferbench.engine.tasks import TaskKind

# What ``finetune.augment: auto`` picks on the CPU: benchmarks/augment.py measured the batched path
# faster there too (benchmarks/README.md, "Augmentation"), so auto is the device path everywhere.
CPU_AUTO: Literal["device", "cpu"] = "device"


@dataclass(frozen=True)
class AugmentParams:
    """Each sample's draw, batch first: crop corner (pixels of the cached image), rotation in degrees
    (counter-clockwise, as torchvision's), and whether it is flipped."""

    top: torch.Tensor  # int64
    left: torch.Tensor  # int64
    angle: torch.Tensor  # float32
    flip: torch.Tensor  # bool


class BatchAugment:
    """Random crop to ``img_size``, rotation in ±``rotation_degrees``, horizontal flip (p=0.5 when ``hflip``)
    and normalisation by ``mean``/``std``, per sample, on a uint8 batch wherever it lives."""

    def __init__(self, img_size: int, *, rotation_degrees: float, hflip: bool, mean: Sequence[float],
                 std: Sequence[float], dtype: torch.dtype = torch.float32) -> None:
        self.img_size, self.rotation_degrees, self.hflip = img_size, float(rotation_degrees), hflip
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype

    def sample(self, batch: int, side: int, generator: torch.Generator) -> AugmentParams:
        """Draw ``batch`` samples' parameters for an S=``side`` px image, always in this order (top, left,
        angle, flip), so a seed fixes all of them whatever the settings."""
        if side < self.img_size:
            raise ValueError(f"cached side {side} px is smaller than the crop img_size {self.img_size}")
        span = side - self.img_size + 1
        top = torch.randint(span, (batch,), generator=generator)
        left = torch.randint(span, (batch,), generator=generator)
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * self.rotation_degrees
        flip = torch.rand(batch, generator=generator) < 0.5
        return AugmentParams(top, left, angle, flip & self.hflip)

    def grid(self, params: AugmentParams, side: int, device: torch.device) -> torch.Tensor:
        """The sampling grid (B, img, img, 2), in ``grid_sample``'s normalised coordinates of the S-px image.

        An output pixel p (centred on the output's centre) reads the cached image at
        corner + (img - 1)/2 + R·F·p, where F flips x and R rotates by the angle (counter-clockwise on screen,
        so with y pointing down R = [[cos, -sin], [sin, cos]]). In normalised coordinates
        (align_corners=False) that is theta = [(img/S)·R·F | (2·corner + img)/S - 1]."""
        size, n = self.img_size, len(params.angle)
        radians = params.angle.to(device, torch.float32) * (math.pi / 180)
        cos, sin = torch.cos(radians), torch.sin(radians)
        sign = 1.0 - 2.0 * params.flip.to(device, torch.float32)  # -1: flipped
        scale = size / side
        top = params.top.to(device, torch.float32)
        left = params.left.to(device, torch.float32)
        theta = torch.stack([
            torch.stack([scale * cos * sign, -scale * sin, (2 * left + size) / side - 1], dim=1),
            torch.stack([scale * sin * sign, scale * cos, (2 * top + size) / side - 1], dim=1),
        ], dim=1)
        return F.affine_grid(theta, [n, 1, size, size], align_corners=False)

    def window(self, params: AugmentParams, side: int, device: torch.device) -> torch.Tensor:
        """(B, 1, S, S), True inside each sample's crop: what is outside reads as the 0 fill, as in
        torchvision's rotation of the crop itself."""
        pixels = torch.arange(side, device=device)

        def inside(corner: torch.Tensor) -> torch.Tensor:
            corner = corner.to(device)[:, None]
            return (pixels >= corner) & (pixels < corner + self.img_size)

        return (inside(params.top)[:, :, None] & inside(params.left)[:, None, :])[:, None]

    def apply(self, images: torch.Tensor, targets: Any, params: AugmentParams) -> tuple[torch.Tensor, Any]:
        """Augmented, normalised images (B, 3, img, img) in ``dtype``, and ``targets`` with every per-pixel map
        (3 or more dimensions, batch first) moved with its image; per-sample values pass through."""
        side = images.shape[-1]
        grid, window = self.grid(params, side, images.device), self.window(params, side, images.device)
        source = torch.cat([images.to(self.dtype) * window, window.to(self.dtype)], dim=1)
        sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # torchvision's fill: the sampled image times the share of each pixel's bilinear footprint inside the
        # crop (so the rim of a rotated crop fades as RandomRotation's does, not only by the zero padding)
        out = sampled[:, :-1] * sampled[:, -1:]
        mean = torch.tensor(self.mean, dtype=self.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=self.dtype, device=images.device).view(1, -1, 1, 1)
        if not images.dtype.is_floating_point:  # uint8 -> [0, 1], as torchvision's ToDtype(scale=True)
            out = out / torch.iinfo(images.dtype).max
        return (out - mean) / std, _maps(targets, grid, window)

    def __call__(self, images: torch.Tensor, targets: Any, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        return self.apply(images, targets, self.sample(len(images), images.shape[-1], generator))


def _maps(targets: Any, grid: torch.Tensor, window: torch.Tensor) -> Any:
    """Per-pixel maps through ``grid`` by nearest neighbour, 0 outside ``window`` (values kept exactly:
    float64 holds any int64 label a dataset has)."""
    if isinstance(targets, dict):
        return {k: _maps(v, grid, window) for k, v in targets.items()}
    if targets.ndim < 3:
        return targets
    planes = targets.reshape(len(targets), -1, *targets.shape[-2:])
    dtype = torch.float64 if targets.dtype in (torch.int64, torch.float64) else torch.float32
    moved = F.grid_sample(planes.to(dtype) * window, grid.to(dtype), mode="nearest", padding_mode="zeros",
                          align_corners=False)
    return moved.to(targets.dtype).reshape(*targets.shape[:-2], *moved.shape[-2:])


def batch_augment(protocol: FinetuneSettings, kind: TaskKind, *, device: torch.device, img_size: int,
                  mean: Sequence[float], std: Sequence[float]) -> BatchAugment | None:
    """The device augmentation for this run, or None: the CPU path in the DataLoader.

    ``finetune.augment``: ``device``, ``cpu``, or ``auto`` (device on CUDA; on the CPU ``CPU_AUTO``, what
    benchmarks/augment.py measured faster). A kind whose own augmentation has no batched form
    (``TaskKind.batch_augmentation`` is None: age's shear) stays on the CPU path whatever the setting."""
    choice = protocol.augment
    if choice == "auto":
        choice = "device" if torch.device(device).type == "cuda" else CPU_AUTO
    form = kind.batch_augmentation(protocol)
    if choice == "cpu" or form is None:
        return None
    rotation, hflip = form
    return BatchAugment(img_size, rotation_degrees=rotation, hflip=hflip, mean=mean, std=std)
