"""The training data path's throughput with the augmentation per sample on the CPU or per batch on the device.

``finetune.augment`` picks where crop, rotation and flip run: ``cpu`` is ``CachedImages`` with torchvision
per sample in the DataLoader (0 loader processes, as the smoke study runs it); ``device`` is the same loader
handing out the cached uint8 images uncropped, then ``engine.augment.BatchAugment`` on the whole batch
after the transfer to the device. Both are timed from the first batch request to the normalised
``img_size`` batch on the device (synchronised on CUDA), on a synthetic uint8 cache of the side that
``img_size`` is cropped from (``img_size`` / 0.875, timm's usual crop_pct). Each repeat is one pass over
``--images`` images; the figure is the median of ``--repeats`` passes after one untimed pass. The two
paths alternate, so a drift of the machine's speed hits both alike. ``auto`` on the CPU
(``augment.CPU_AUTO``) is set from this measurement.

Run alone: ``python -m benchmarks.augment [--device cpu] [--out benchmarks/results/augment-cpu-<date>.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.stats import Summary
from transferbench.engine.augment import BatchAugment
from transferbench.engine.data import CachedImages, train_loader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as timm's configs give them
ROTATION = 30.0  # PROTOCOL.md


def write_cache(path: Path, *, count: int, side: int) -> Path:
    """A cache file in ``build_cache``'s layout: random uint8 images, two classes."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator)
    torch.save({"images": images, "targets": torch.arange(count) % 2, "filenames": [f"{i}.png" for i in range(count)]},
               path)
    return path


def _pass(loader: Any, augment: BatchAugment | None, device: torch.device, epoch: int) -> float:
    """Images/s of one pass: batches to ``device``, augmented there when ``augment``."""
    loader.sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch)
    started, seen = time.perf_counter(), 0
    for images, targets, _ in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if augment is not None:
            images, targets = augment(images, targets, generator)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - started)


def measure(*, img_size: int, batch: int, images: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """{"cpu": Summary, "device": Summary} of img/s for one input size, and the set-up measured."""
    side = round(img_size / 0.875)
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "cache.pt", count=images, side=side)
        common = {"img_size": img_size, "mean": MEAN, "std": STD, "train": True, "rotation_degrees": ROTATION,
                  "hflip": True}
        per_sample = train_loader(CachedImages(cache, **common), batch_size=batch, seed=0)
        batched = train_loader(CachedImages(cache, **common, device_augment=True), batch_size=batch, seed=0)
    augment = BatchAugment(img_size, rotation_degrees=ROTATION, hflip=True, mean=MEAN, std=STD)
    arms = {"cpu": (per_sample, None), "device": (batched, augment)}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for epoch in range(repeats + 1):
        for name, (loader, aug) in arms.items():
            rate = _pass(loader, aug, device, epoch)
            if epoch:  # the first pass warms caches and kernels up, untimed
                rates[name].append(rate)
    return {"img_size": img_size, "cached_side": side, "batch": batch, "images_per_pass": images,
            "img_per_s": {name: Summary.of(values).to_dict() for name, values in rates.items()},
            "device_over_cpu": Summary.of([d / c for c, d in zip(rates["cpu"], rates["device"],
                                                                  strict=True)]).to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.augment", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="224,64", help="img_size values, comma-separated (default %(default)s)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=512, help="images per timed pass (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    command = " ".join(["python -m benchmarks.augment", *(argv if argv is not None else sys.argv[1:])])
    results = [measure(img_size=int(s), batch=args.batch, images=args.images, repeats=args.repeats, device=device)
               for s in args.sizes.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"command": command, "device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'img_size':>8} {'batch':>5} {'cpu img/s':>26} {'device img/s':>26} device/cpu")
    for r in results:
        cpu, dev = (Summary(**r["img_per_s"][k]) for k in ("cpu", "device"))
        print(f"{r['img_size']:>8} {r['batch']:>5} {cpu.text():>26} {dev.text():>26} "
              f"{Summary(**r['device_over_cpu']).text(2)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
