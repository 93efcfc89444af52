"""Training throughput: the pipeline's Ray Train worker vs a plain timm loop, FLOPs and the data path.

What is measured (issue #8, items 1-3 and the CPU half of 5):

- ``run_pipeline``: the engine's own code path, unchanged: ``fit_on_ray`` -> ``train_worker``
  (TorchTrainer worker, ``CachedImages`` + ``train_loader``, ``loop.fit``, the MLflow tracker
  with system metrics, a Ray checkpoint every epoch, the model logged at the end). Throughput
  of epoch k is read back from the run's own MLflow record: the interval between the
  ``train_loss`` timestamps of epochs k-1 and k covers epoch k's training steps, its (tiny)
  validation pass, epoch k-1's checkpoint and the MLflow logging, i.e. the whole steady-state
  cycle. Epochs 1-2 (allocator warm-up, the first checkpoint) are never counted in the cycle
  figure, epoch 1 not in the compute figure; Ray start-up is reported apart.
- ``run_plain``: what a user writes by hand: ``timm.create_model`` with the same head, Adam,
  label-smoothed cross-entropy, a shuffled ``DataLoader`` over the same cached uint8 images with
  the same augmentation, ``torch.set_num_threads`` = the worker's CPUs; timed per epoch.
- ``run_engine``: the engine's loop alone (``ray_worker.run``'s model, loaders and ``loop.fit``,
  no hooks) in this process's main thread, so ``gap_factors`` can split pipeline/plain into the
  loop's own code, running it in a Ray Train worker, and the per-epoch checkpoint + MLflow calls.
- ``train_flops_per_image``: ``torch.utils.flop_counter.FlopCounterMode`` over one forward +
  backward of the engine's classifier, divided by the batch size.
- ``matmul_rate``: dense float32 ``torch.mm`` FLOP/s with the same thread count (the ceiling).
- ``loader_rate``: images/s of ``train_loader`` over ``CachedImages`` alone (cache -> augmented
  float tensors), the data path each worker runs in its own process before every step.

Backbones are built with ``weights: none`` (random initialisation): throughput does not depend
on the weights' values, and the benchmark must run offline.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from transferbench.config import (
    BackboneSettings,
    DataSettings,
    FinetuneSettings,
    RaySettings,
    TaskSettings,
    TrackingSettings,
)
from transferbench.engine import loop
from transferbench.engine.data import CachedImages, eval_loader, train_loader
from transferbench.engine.inputs import TaskInputs, prepare_inputs
from transferbench.engine.ray_driver import fit_on_ray
from transferbench.engine.spec import HARDWARE_KEYS, WorkerSpec
from transferbench.engine.tasks import TaskKind
from transferbench.engine.tracking import RunRegistry
from transferbench.models import build_model
from transferbench.paths import SPLITS

TASK = "bench"
CLASSES = ("bright", "dark")
BENCH_TASK = TaskSettings(dataset="synthetic", split={"rule": "random"})  # classification, two classes
STUDY = "benchmark"


def write_task(root: Path, *, n_train: int, n_eval: int, side: int, distinct: int = 64) -> Path:
    """Manifests + PNGs of a two-class task in the split stage's format; returns the splits dir.

    ``distinct`` PNGs are written and reused across rows (the cache decodes every row anyway).
    """
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(distinct):
        base = 170 if i % 2 == 0 else 85
        pixels = np.clip(rng.normal(base, 40, size=(side, side, 3)), 0, 255).astype(np.uint8)
        path = images / f"{i:03d}.png"
        Image.fromarray(pixels).save(path)
        files.append((str(path), CLASSES[i % 2]))
    task_dir = root / "splits" / TASK
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        rows = [{"filename": files[i % distinct][0], "label": files[i % distinct][1], "group": f"g{i}"}
                for i in range(n)]
        pd.DataFrame(rows).to_csv(task_dir / f"{split}.csv", index=False)
    (task_dir / "summary.json").write_text(json.dumps({"classes": sorted(CLASSES)}))
    return root / "splits"


@dataclass(frozen=True)
class Workload:
    """One backbone's training set-up, shared by the pipeline and the plain loop."""

    name: str
    entry: BackboneSettings
    protocol: FinetuneSettings
    inputs: TaskInputs
    filenames: dict[str, tuple[str, ...]]

    @property
    def kind(self) -> TaskKind:
        return self.inputs.kind

    @property
    def img_size(self) -> int:
        return self.inputs.img_size

    @property
    def classes(self) -> tuple[str, ...]:
        return self.inputs.kind.classes

    @property
    def mean(self) -> tuple[float, ...]:
        return self.inputs.spec.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.inputs.spec.std

    @property
    def cache_files(self) -> dict[str, str]:
        return {s: str(p) for s, p in self.inputs.caches.items()}


def prepare(name: str, entry: BackboneSettings, protocol: FinetuneSettings, *, splits_dir: Path,
            cache_dir: Path) -> Workload:
    """Random-init backbone, timm's input spec and the decoded cache, as the fine-tune stage prepares them."""
    entry = entry.model_copy(update={"weights": "none", "img_size": None})  # --img-size applies to all
    data = DataSettings(splits_dir=str(splits_dir), cache_dir=str(cache_dir))
    inputs = prepare_inputs(data, TASK, BENCH_TASK, entry, protocol)
    filenames = {s: tuple(str(f) for f in inputs.manifests.frame(s)["filename"]) for s in SPLITS}
    return Workload(name, entry, protocol, inputs, filenames)


def train_dataset(work: Workload) -> CachedImages:
    p = work.protocol
    return CachedImages(work.cache_files["train"], img_size=work.img_size, mean=work.mean, std=work.std,
                        train=True, rotation_degrees=p.rotation_degrees, hflip=p.hflip)


@dataclass(frozen=True)
class PipelineRun:
    """One ``fit_on_ray`` run: steady-state epochs only (warm-up epochs excluded)."""

    cycle_ips: list[float]  # images/s over the whole epoch cycle (train + val + checkpoint + MLflow)
    compute_ips: list[float]  # images/s over loop.fit's own epoch_seconds (train + val)
    wall_s: float  # fit_on_ray, worker start-up and model logging included
    compute_s: float  # sum of every epoch's epoch_seconds
    mlflow_setup_s: float  # RunRegistry (store) + child run creation
    # Per steady epoch: its cycle interval minus its own epoch_seconds, i.e. the checkpoint
    # (torch.save + ray.train.report) and MLflow calls between two loop.fit epochs, in seconds.
    between_epochs_s: list[float] = dataclasses.field(default_factory=list)
    hardware: dict[str, Any] = dataclasses.field(default_factory=dict)  # the worker's device, precision


def epoch_images(history: Sequence[dict[str, float]], batch: int) -> list[int]:
    """Training images of each epoch of a ``loop.fit`` history (optimiser steps x batch)."""
    steps = [int(r["step"]) for r in history]
    return [batch * (b - a) for a, b in zip([0, *steps[:-1]], steps, strict=True)]


def compute_ips(history: Sequence[dict[str, float]], images: Sequence[int]) -> list[float]:
    """Images/s of each epoch after the first over loop.fit's own ``epoch_seconds`` (steps + val pass)."""
    return [images[k] / history[k]["epoch_seconds"] for k in range(1, len(history))]


def run_pipeline(work: Workload, *, root: Path, tracking_uri: str, num_workers: int, cpus_per_worker: float,
                 system_metrics: bool, log_model: bool, report_interval_s: float,
                 use_gpu: bool = False, loader_workers: int = 0) -> PipelineRun:
    """Train ``work`` through the engine's Ray Train path and read its epochs back from MLflow.

    ``num_workers`` 0: Ray Train local mode (the engine in this process's main thread); >= 1: worker actors.
    ``use_gpu``: one GPU per worker, bf16 autocast and channels-last for ConvNets (``ray.use_gpu``'s defaults).
    ``loader_workers``: ``ray.loader_workers``, the worker's augmentation processes.
    """
    from mlflow import MlflowClient

    started = time.perf_counter()
    registry = RunRegistry(tracking_uri=tracking_uri, experiment="transferbench-bench",
                           artifact_location=root / "mlartifacts")
    run_name = f"{TASK}.{work.name}.w{num_workers}.{uuid.uuid4().hex[:8]}"
    run_id, _ = registry.child_run(study=STUDY, run_key=run_name, run_name=run_name,
                                   tags={"backbone": work.name, "weights_label": "random-init"})
    mlflow_setup = time.perf_counter() - started
    storage = (root / "ray_results").resolve()
    run_dir = storage / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    ray = RaySettings(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=0,
                      checkpoints_to_keep=1, report_interval_s=report_interval_s, loader_workers=loader_workers,
                      storage_path=str(storage))
    spec = WorkerSpec(
        task=TASK, backbone_name=work.name, backbone=work.entry, protocol=work.protocol, kind=work.kind, seed=0,
        img_size=work.img_size, input_spec=work.inputs.spec, cache_files=work.cache_files, filenames=work.filenames,
        run_dir=str(run_dir), ray=ray, tracking=TrackingSettings(system_metrics=system_metrics, log_model=log_model),
        tracking_uri=tracking_uri, mlflow_run_id=run_id)
    started = time.perf_counter()
    final = fit_on_ray(spec, run_name=run_name, storage_path=str(storage))
    wall = time.perf_counter() - started
    history = final["history"]
    # the global batch: each step of N workers takes batch_size images in all
    images = epoch_images(history, work.protocol.batch_size)
    stamps = sorted(MlflowClient(tracking_uri).get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    times = [m.timestamp / 1000.0 for m in stamps]
    # Cycles from epoch 3 on: epoch 2's interval also holds the first checkpoint (Ray storage set-up).
    cycle = [images[k] / (times[k] - times[k - 1]) for k in range(2, len(times)) if times[k] > times[k - 1]]
    compute = compute_ips(history, images)
    between = [times[k] - times[k - 1] - history[k]["epoch_seconds"] for k in range(2, len(times))]
    return PipelineRun(cycle, compute, wall, sum(r["epoch_seconds"] for r in history), mlflow_setup, between,
                       {k: final[k] for k in HARDWARE_KEYS})


def create_plain_model(work: Workload) -> torch.nn.Module:
    """The model a hand-written script would build: timm's own head (dropout + linear)."""
    import timm

    kwargs = {"pretrained": False, "num_classes": len(work.classes), "drop_rate": work.protocol.head_dropout}
    try:
        return timm.create_model(work.entry.model, img_size=work.img_size, **kwargs)
    except TypeError:  # ConvNets take any input size and no img_size argument
        return timm.create_model(work.entry.model, **kwargs)


def run_plain(work: Workload, *, threads: int, epochs: int,
              on_epoch: Callable[[], None] | None = None) -> list[float]:
    """Images/s of each epoch after the first of a minimal timm + PyTorch training loop.

    ``on_epoch`` (if given) is called at the end of every epoch, outside the timed span.
    """
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    p = work.protocol
    model = create_plain_model(work).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr, betas=tuple(p.adam_betas), weight_decay=p.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    data = DataLoader(train_dataset(work), batch_size=p.batch_size, shuffle=True, drop_last=True)
    rates = []
    for epoch in range(epochs):
        started, seen = time.perf_counter(), 0
        for images, targets, _ in data:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(targets)
        if epoch:
            rates.append(seen / (time.perf_counter() - started))
        if on_epoch is not None:
            on_epoch()
    return rates


@dataclass(frozen=True)
class EngineRun:
    """``loop.fit`` alone in this process's main thread: images/s of each epoch after the first."""

    compute_ips: list[float]  # train images of epoch k / loop.fit's epoch_seconds (steps + val pass)
    val_share: float  # the val pass's share of an epoch: a timed ``loop.predict`` over val / median epoch


def run_engine(work: Workload, *, threads: int, epochs: int) -> EngineRun:
    """The engine's training code without Ray and MLflow: ``ray_worker.run``'s model, loaders and
    ``loop.fit`` call (deterministic algorithms on, as in the worker), in this process's main thread,
    with no hooks (no checkpoint, no tracking). Between the plain loop and the pipeline's compute
    figure, it splits the gap into the engine's loop code and running it in a Ray Train worker.
    """
    torch.set_num_threads(threads)
    p = work.protocol.model_copy(update={"max_epochs": epochs, "early_stop_patience": epochs + 1})
    loop.seed_everything(0)
    model = build_model(work.entry, img_size=work.img_size, head=lambda n: work.kind.head(n, p))
    val_set = CachedImages(work.cache_files["val"], img_size=work.img_size, mean=work.mean, std=work.std,
                           train=False)
    val = eval_loader(val_set, batch_size=p.eval_batch_size)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        session = loop.fit(model, train_loader=train_loader(train_dataset(work), batch_size=p.batch_size, seed=0),
                           val_loader=val, protocol=p, kind=work.kind, seed=0)
        started = time.perf_counter()
        loop.predict(model, val, device=torch.device("cpu"))
        val_seconds = time.perf_counter() - started
    finally:
        torch.use_deterministic_algorithms(deterministic)
    history = session.state.history
    compute = compute_ips(history, epoch_images(history, p.batch_size))
    epoch_s = float(np.median([r["epoch_seconds"] for r in history[1:]]))
    return EngineRun(compute, val_seconds / epoch_s)


def train_flops_per_image(work: Workload, *, batch: int = 4) -> float:
    """FLOPs of one training step (forward + backward) of the engine's classifier, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(work.entry, img_size=work.img_size, head=lambda n: work.kind.head(n, work.protocol)).train()
    images = torch.randn(batch, 3, work.img_size, work.img_size)
    targets = torch.arange(batch) % len(work.classes)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(images), targets).backward()
    return counter.get_total_flops() / batch


def _rates(op: Callable[[], object], flops: float, *, repeats: int, per_repeat: int = 1,
           sync: Callable[[], None] | None = None) -> list[float]:
    """FLOP/s of ``op`` (``flops`` a call), one value per repeat of ``per_repeat`` calls, after one warm-up."""
    rates = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if sync is not None:
                sync()
            started = time.perf_counter()
            for _ in range(per_repeat):
                op()
            if sync is not None:
                sync()
            if i:
                rates.append(per_repeat * flops / (time.perf_counter() - started))
    return rates


def matmul_rate(*, threads: int, size: int, repeats: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> list[float]:
    """FLOP/s of a dense ``size`` x ``size`` matmul, one value per repeat (after one warm-up)."""
    if device == "cpu":
        torch.set_num_threads(threads)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    on_cpu = device == "cpu"
    return _rates(lambda: torch.mm(a, b), 2 * size**3, repeats=repeats, per_repeat=1 if on_cpu else 20,
                  sync=None if on_cpu else torch.cuda.synchronize)


# Dense fp32 convolutions for the CPU ceiling, (name, batch, channels, side, kernel): PyTorch runs
# them through oneDNN's own kernels, torch.mm through the BLAS (MKL). On this AMD EPYC, MKL's sgemm
# reaches ~185 GFLOP/s and oneDNN's convolutions 300-360: a ResNet's training step beats "the
# matmul rate", so the ceiling is the best of the three.
CONV_KERNELS = (("conv1x1", 16, 2048, 16, 1), ("conv3x3", 32, 256, 28, 3))


def conv_rate(*, threads: int, batch: int, channels: int, side: int, kernel: int, repeats: int) -> list[float]:
    """FLOP/s of a dense ``kernel`` x ``kernel`` convolution (``channels`` in and out, stride 1, same
    padding, no bias), 2 FLOPs per multiply-add as the FLOP counter counts them; one value per repeat."""
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
    x = torch.randn(batch, channels, side, side)
    return _rates(lambda: conv(x), 2 * batch * channels * channels * kernel * kernel * side * side,
                  repeats=repeats)


def dense_rates(*, threads: int, matmul_size: int, repeats: int) -> dict[str, list[float]]:
    """FLOP/s per dense kernel: ``mm`` (BLAS) and ``CONV_KERNELS`` (oneDNN); the ceiling is the best median."""
    rates = {"mm": matmul_rate(threads=threads, size=matmul_size, repeats=repeats)}
    for name, batch, channels, side, kernel in CONV_KERNELS:
        rates[name] = conv_rate(threads=threads, batch=batch, channels=channels, side=side, kernel=kernel,
                                repeats=repeats)
    return rates


def loader_rate(work: Workload, *, threads: int, passes: int, workers: int = 0) -> list[float]:
    """Images/s of the training data path alone: cached uint8 -> crop/rotate/flip -> normalised batch,
    in this process (``workers`` 0) or in ``workers`` DataLoader processes (``ray.loader_workers``)."""
    torch.set_num_threads(threads)
    loader = train_loader(train_dataset(work), batch_size=work.protocol.batch_size, seed=0, workers=workers)
    rates = []
    for epoch in range(passes + 1):
        loader.sampler.set_epoch(epoch)
        started, seen = time.perf_counter(), 0
        for images, _, _ in loader:
            seen += len(images)
        if epoch:
            rates.append(seen / (time.perf_counter() - started))
    return rates


def alternate(work: Workload, *, repeats: int, epochs: int, threads: int, cpus_per_worker: float, root: Path,
              tracking_uri: str, system_metrics: bool, log_model: bool, report_interval_s: float,
              pipeline_workers: int = 0) -> tuple[list[PipelineRun], list[list[float]], list[EngineRun]]:
    """Pipeline (``pipeline_workers`` 0: local mode; 1: one Ray Train worker actor), plain loop and the
    engine's loop alone, alternated A B C A B C in this process; ``repeats`` rounds."""
    pipeline, plain, engine = [], [], []
    for _ in range(repeats):
        torch.set_num_threads(threads)  # local mode trains in this process with its threads
        pipeline.append(run_pipeline(work, root=root, tracking_uri=tracking_uri, num_workers=pipeline_workers,
                                     cpus_per_worker=cpus_per_worker, system_metrics=system_metrics,
                                     log_model=log_model, report_interval_s=report_interval_s))
        plain.append(run_plain(work, threads=threads, epochs=epochs))
        engine.append(run_engine(work, threads=threads, epochs=epochs))
    return pipeline, plain, engine


def pair_ratios(pipeline: Sequence[PipelineRun], plain: Sequence[Sequence[float]]) -> list[float]:
    """Per A/B pair: pipeline cycle images/s (median of its epochs) / plain images/s (median)."""
    return [float(np.median(a.cycle_ips)) / float(np.median(b)) for a, b in zip(pipeline, plain, strict=True)
            if a.cycle_ips and b]


def gap_factors(pipeline: Sequence[PipelineRun], plain: Sequence[Sequence[float]],
                engine: Sequence[EngineRun]) -> dict[str, list[float]]:
    """Per round, the pipeline/plain ratio as a product of three measured factors (medians of epochs):

    - ``loop_code``: engine loop alone / plain loop, both in this process's main thread (the
      engine's classifier, loaders, val pass and per-step bookkeeping);
    - ``ray_worker``: the pipeline's loop.fit epochs / the engine loop alone (the same code in a
      Ray Train worker: its thread, Ray's and MLflow's threads, Ray Train's helper processes);
    - ``per_epoch``: the pipeline's epoch cycle / its loop.fit epochs (checkpoint, MLflow logging).
    """
    out: dict[str, list[float]] = {"loop_code": [], "ray_worker": [], "per_epoch": [], "val_share": []}
    for run, base, alone in zip(pipeline, plain, engine, strict=True):
        if not (run.cycle_ips and run.compute_ips and base and alone.compute_ips):
            continue
        cycle, compute = float(np.median(run.cycle_ips)), float(np.median(run.compute_ips))
        own = float(np.median(alone.compute_ips))
        out["loop_code"].append(own / float(np.median(base)))
        out["ray_worker"].append(compute / own)
        out["per_epoch"].append(cycle / compute)
        out["val_share"].append(alone.val_share)
    return out
