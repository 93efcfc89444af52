"""Split manifests -> a decoded image cache -> augmented tensors (PROTOCOL.md augmentation).

Manifest contract (written by the split stage): ``<splits_dir>/<task>/{train,val,test}.csv``
with columns ``filename`` (relative to the working directory, or absolute), ``group`` and what
the task kind turns into a target (``label`` for classification); ``summary.json`` beside them
holds the task's label space (``classes`` for classification).

Every image is decoded as the split's probe decoded it (``imaging.decode_rgb``: upright by its
EXIF orientation, made RGB: grayscale X-rays -> 3 channels) and resized ONCE into a uint8 tensor file
per (task, split, side), with the task kind's targets, keyed by the manifest's content hash (which
carries each image's md5), so epochs never reopen full-size images. Training augments those tensors
in memory: random crop to ``img_size``, random rotation in [-d, d] degrees, horizontal flip.
Evaluation takes the centre crop.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from transferbench.errors import DataError
from transferbench.imaging import decode_rgb
from transferbench.paths import SPLITS
from transferbench.progress import progress

if TYPE_CHECKING:
    from transferbench.engine.tasks import TaskKind

CACHE_FORMAT = 3  # bump when the cached layout, the decoding or the resizing changes (3: EXIF orientation)


@dataclass(frozen=True)
class TaskManifests:
    """The three manifests of one task and its split summary (``summary.json``)."""

    task: str
    paths: dict[str, Path]
    summary: dict[str, Any] = field(hash=False, compare=False)

    def frame(self, split: str) -> pd.DataFrame:
        return pd.read_csv(self.paths[split], dtype={"label": str})

    def md5(self, split: str) -> str:
        """DVC's hash of the manifest file (the md5 ``dvc.lock`` records for it)."""
        return hashlib.md5(self.paths[split].read_bytes()).hexdigest()

    def data_version(self) -> str:
        """One hash for the task's split: the md5s of the three manifests and the label space."""
        text = json.dumps({"classes": list(self.summary.get("classes", [])), **{s: self.md5(s) for s in SPLITS}},
                          sort_keys=True)
        return hashlib.md5(text.encode()).hexdigest()


def read_manifests(splits_dir: str | Path, task: str) -> TaskManifests:
    root = Path(splits_dir) / task
    paths = {split: root / f"{split}.csv" for split in SPLITS}
    for path in [*paths.values(), root / "summary.json"]:
        if not path.is_file():
            raise DataError(f"{path}: split manifest not found (run the split stage: `dvc repro split`)")
    try:
        summary = json.loads((root / "summary.json").read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{root / 'summary.json'}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{root / 'summary.json'}: expected a JSON object")
    return TaskManifests(task, paths, summary)


def load_rgb(source: str | Path | BinaryIO | Image.Image, side: int) -> torch.Tensor:
    """An image (a file, an open binary stream or a decoded image) as the cache holds it: uint8 (3, side, side),
    decoded as the split's probe decodes it (``imaging.decode_rgb``: EXIF orientation applied, 16-bit and
    float images rescaled to 8 bit by their maximum, made RGB), then the centre square resized to ``side``.
    The served model (``engine.serving``) reads its inputs through this too. A decompression bomb raises
    ``Image.DecompressionBombError`` before it is decoded."""
    image = ImageOps.fit(decode_rgb(source), (side, side), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def build_cache(manifests: TaskManifests, split: str, *, kind: TaskKind, side: int, cache_dir: str | Path) -> Path:
    """Decode and resize one split once, with ``kind``'s targets; returns the cache file (reused while the
    manifest, the side and the task kind's label space are unchanged)."""
    identity = f"{CACHE_FORMAT}:{side}:{manifests.md5(split)}:{kind!r}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    out = Path(cache_dir) / manifests.task / f"{split}-{side}px-{key}.pt"
    if out.is_file():
        return out
    frame = manifests.frame(split)
    # a bad row fails here, before any image decoding; dense maps are resized as their images are
    targets = kind.targets(frame, manifests.paths[split], side=side)
    images = torch.empty((len(frame), 3, side, side), dtype=torch.uint8)
    bar = progress(frame["filename"], desc=f"cache {manifests.task}/{split} {side}px", total=len(frame), unit="img")
    for row, filename in enumerate(bar):
        try:
            images[row] = load_rgb(Path(filename), side)
        except (OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"{manifests.paths[split]} row {row + 2}: cannot read image {filename}: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": images, "targets": targets, "filenames": list(frame["filename"])}, tmp)
    os.replace(tmp, out)  # atomic: a concurrent reader never sees half a file
    return out


def _sample(targets: Any, i: int) -> Any:
    """Row ``i`` of a target tensor or of each tensor of a dict; per-pixel maps (2-d and more) as ``Mask``, so the
    geometric transforms move them with the image (nearest neighbour) and the photometric ones leave them."""
    if isinstance(targets, dict):
        return {k: _sample(v, i) for k, v in targets.items()}
    row = targets[i]
    return tv_tensors.Mask(row) if row.ndim >= 2 else row


def _plain(target: Any) -> Any:
    if isinstance(target, dict):
        return {k: _plain(v) for k, v in target.items()}
    return target.as_subclass(torch.Tensor) if isinstance(target, tv_tensors.TVTensor) else target


def _length(targets: Any) -> int:
    return len(next(iter(targets.values()))) if isinstance(targets, dict) else len(targets)


def _normalise(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Transform:
    """What evaluation does to a cached uint8 image: the centre ``img_size`` crop, then normalisation."""
    return v2.Compose([v2.CenterCrop(img_size), *_normalise(mean, std)])


class CachedImages(Dataset):
    """Cached uint8 images -> (normalised float tensor, target, index), augmented when ``train``: ``augment``
    (the task kind's ``train_transforms``) if given, else random crop, rotation and flip from the protocol.
    The image and its target go through the transforms together: per-pixel targets (masks, depth maps) are
    cropped and flipped with their image, scalar targets pass through.

    ``device_augment`` (training only): no transform at all; each item is the cached uint8 image, uncropped,
    and its target, for ``engine.augment.BatchAugment`` to augment a whole batch on the training device."""

    def __init__(self, cache_file: str | Path, *, img_size: int, mean: Sequence[float], std: Sequence[float],
                 train: bool, rotation_degrees: float = 0.0, hflip: bool = False,
                 augment: v2.Transform | None = None, device_augment: bool = False) -> None:
        blob = torch.load(cache_file, weights_only=True)
        self.images: torch.Tensor = blob["images"]
        self.targets: torch.Tensor = blob["targets"]
        self.raw = train and device_augment
        steps: list[v2.Transform] = []
        if train and augment is not None:  # the task kind's own augmentation (e.g. age: affine + shear)
            steps.append(augment)
        elif train:
            steps.append(v2.RandomCrop(img_size))
            if rotation_degrees:
                steps.append(v2.RandomRotation(rotation_degrees))
            if hflip:
                steps.append(v2.RandomHorizontalFlip())
        else:
            steps.append(v2.CenterCrop(img_size))
        self.transform = v2.Compose([*steps, *_normalise(mean, std)])

    def __len__(self) -> int:
        return _length(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any, int]:
        if self.raw:
            return self.images[i], _plain(_sample(self.targets, i)), i
        image, target = self.transform(tv_tensors.Image(self.images[i]), _sample(self.targets, i))
        return image.as_subclass(torch.Tensor), _plain(target), i


class RoundSampler(Sampler[int]):
    """The iteration-based protocol's training order: round ``epoch`` (1-based) is ``every`` batches (fewer for
    the last round, to stop at ``total`` iterations) of seeded shuffles of the dataset, concatenated, this
    rank's share. Seeded by (seed, epoch), so a run resumed at a round replays it as an uninterrupted run would."""

    def __init__(self, size: int, *, batch_size: int, every: int, total: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.size, self.batch_size, self.every, self.total = size, batch_size, every, total
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> int:
        return max(0, min(self.every, self.total - (self.epoch - 1) * self.every))

    def __len__(self) -> int:
        return self._batches() * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        needed = len(self) * self.world_size
        order = torch.cat([torch.randperm(self.size, generator=generator)
                           for _ in range(-(-needed // self.size))]) if needed else torch.empty(0, dtype=torch.int64)
        return iter(order[:needed][self.rank::self.world_size].tolist())


def _processes(workers: int, pin_memory: bool) -> dict[str, object]:
    """DataLoader keywords for ``workers`` augmentation processes (0: in the calling process)."""
    if not workers:
        return {"num_workers": 0, "pin_memory": pin_memory}
    return {"num_workers": workers, "persistent_workers": True, "prefetch_factor": 4, "pin_memory": pin_memory}


def train_loader(dataset: CachedImages, *, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, workers: int = 0, pin_memory: bool = False,
                 rounds: tuple[int, int] | None = None) -> DataLoader:
    """Shuffled, sharded across ranks by a seeded sampler (call ``sampler.set_epoch`` each epoch).

    Augmentation runs on small in-memory tensors, in the calling process (``workers`` 0) or in
    ``workers`` persistent DataLoader processes (``ray.loader_workers``; each draws its random
    augmentations from a seed derived from torch's seed, so a run stays repeatable, but a run resumed
    from a checkpoint no longer replays the augmentations of an uninterrupted one). The last short
    batch is dropped so BatchNorm never sees a batch of one.

    ``rounds`` (every, total): the iteration-based protocol; each "epoch" is a round of ``every`` batches
    (``RoundSampler``) until ``total`` iterations.
    """
    if rounds is not None:
        sampler = RoundSampler(len(dataset), batch_size=batch_size, every=rounds[0], total=rounds[1], seed=seed,
                               rank=rank, world_size=world_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                          **_processes(workers, pin_memory))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    drop_last = len(dataset) // world_size > batch_size
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      **_processes(workers, pin_memory))


def eval_loader(dataset: CachedImages, *, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """This rank's share of the samples (``rank::world_size``, no padding); gather to get all."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, **_processes(workers, pin_memory))
