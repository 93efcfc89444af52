"""GPU ceiling (issue #8, item 5): bf16 training throughput of paper-scale backbones vs the GPU's matmul rate.

Runs only where CUDA is present; elsewhere it returns ``{"skipped": ...}``. For ViT-B/16 and
ResNet-50 (random init, 224 px):

- **bare step**: the engine's training step as ``loop.fit`` runs it on GPU (the engine's classifier,
  Adam, label-smoothed cross-entropy, bf16 autocast, channels-last input and weights for the
  ConvNet), optionally under ``torch.compile``, on synthetic on-device batches. Achieved TFLOP/s =
  training FLOPs per image (``FlopCounterMode``) x images/s, as a fraction of the measured dense bf16
  matmul rate.
- **pipeline** (on unless ``--no-pipeline`` / ``benchmarks.run --no-gpu-pipeline``): the same backbone
  through the engine's GPU path end to end -- a Ray Train worker with ``use_gpu``, the cached-image
  data path (decode once, augment per step on the worker's CPUs), MLflow logging and a checkpoint
  per epoch -- at the protocol's batch, against the bare step at that batch with the worker's
  settings (deterministic algorithms, no cuDNN autotuning) and the data path alone.

``python -m benchmarks.gpu`` runs this section alone (it needs no DVC) and writes
``gpu.json`` + ``gpu.md``; ``python -m benchmarks.run`` includes the same section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import report, training
from benchmarks.stats import Summary
from benchmarks.training import matmul_rate
from transferbench.engine.cluster import connect
from transferbench.config import BackboneSettings, FinetuneSettings, load_settings
from transferbench.models import build_model

MODELS = {
    "vit_b16": BackboneSettings(model="vit_base_patch16_224", family="transformer", weights="none", preset="paper"),
    "resnet50": BackboneSettings(model="resnet50", family="convnet", weights="none", preset="paper"),
}


def _flops_per_image(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        torch.nn.functional.cross_entropy(model(images).float(), targets).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(images)


def _throughput(name: str, entry: BackboneSettings, *, batch: int, steps: int, repeats: int,
                compile_model: bool, peak: float, deterministic: bool = False) -> dict[str, Any]:
    """The bare step's figures; ``deterministic``: with the Ray worker's settings (deterministic
    algorithms on, cuDNN autotuning off) instead of the fastest ones."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    try:
        return _timed_steps(name, entry, batch=batch, steps=steps, repeats=repeats, compile_model=compile_model,
                            peak=peak) | {"deterministic": deterministic}
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=True)
        torch.backends.cudnn.benchmark = previous[1]


def _timed_steps(name: str, entry: BackboneSettings, *, batch: int, steps: int, repeats: int,
                 compile_model: bool, peak: float) -> dict[str, Any]:
    torch.manual_seed(0)
    channels_last = entry.family == "convnet"
    head = lambda n: torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(n, 1000))  # noqa: E731
    model = build_model(entry, img_size=224, head=head).cuda().train()
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch,), device="cuda")
    flops = _flops_per_image(model, images, targets)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step_model = torch.compile(model) if compile_model else model

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = step_model(images)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5 if not compile_model else 10):  # warm-up (and compilation)
        step()
    rates = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        rates.append(steps * batch / (time.perf_counter() - started))
    ips = Summary.of(rates)
    tflops = Summary.of([r * flops / 1e12 for r in rates])
    return {"backbone": name, "model": entry.model, "batch": batch, "img_size": 224, "compile": compile_model,
            "channels_last": channels_last, "dtype": "bf16 autocast", "images_per_s": ips.to_dict(),
            "train_gflops_per_image": flops / 1e9, "achieved_tflops": tflops.to_dict(),
            "fraction_of_matmul": Summary.of([r * flops / peak for r in rates]).to_dict()}


PIPELINE_STEPS = 40  # optimiser steps per epoch of the GPU pipeline run
PIPELINE_EPOCHS = 5  # 2 of them warm-up (the cycle figure starts at epoch 3)


def pipeline_protocol(finetune: FinetuneSettings, epochs: int = PIPELINE_EPOCHS) -> FinetuneSettings:
    """params.yaml's protocol for the GPU pipeline run: 224 px, every epoch run, the whole network trained."""
    return finetune.model_copy(update={"mode": "full", "warmup_iters": 0, "max_epochs": epochs,
                                       "early_stop_patience": epochs + 1, "img_size": 224})


def pipeline_on_gpu(name: str, entry: BackboneSettings, protocol: FinetuneSettings, *, root: Path, steps: int,
                    cpus_per_worker: float, loader_workers: Sequence[int], loader_passes: int, peak: float,
                    report_interval_s: float) -> list[dict[str, Any]]:
    """``name`` through the engine's GPU path (one Ray Train worker with a GPU) and its data path alone
    on the worker's CPUs, once per ``ray.loader_workers`` value, against the bare step at the same
    batch with the worker's settings. One row per ``loader_workers`` value."""
    batch = protocol.batch_size
    work_root = root / name
    splits = training.write_task(work_root, n_train=steps * batch, n_eval=protocol.eval_batch_size, side=256)
    work = training.prepare(name, entry, protocol, splits_dir=splits, cache_dir=work_root / "cache")
    bare = _throughput(name, entry, batch=batch, steps=steps, repeats=3, compile_model=False, peak=peak,
                       deterministic=True)
    torch.cuda.empty_cache()
    bare_ips = float(bare["images_per_s"]["median"])
    rows = []
    for workers in loader_workers:
        run = training.run_pipeline(work, root=work_root, tracking_uri=f"sqlite:///{work_root / 'mlruns.db'}",
                                    num_workers=1, cpus_per_worker=cpus_per_worker, system_metrics=True,
                                    log_model=False, report_interval_s=report_interval_s, use_gpu=True,
                                    loader_workers=workers)
        if run.hardware.get("device", "cpu") == "cpu":
            raise RuntimeError(f"the Ray worker trained {name} on {run.hardware}, not on the GPU")
        loader = training.loader_rate(work, threads=max(1, int(cpus_per_worker)), passes=loader_passes,
                                      workers=workers)
        rows.append({"backbone": name, "model": entry.model, "batch": batch, "img_size": protocol.img_size,
                     "steps_per_epoch": steps, "epochs": protocol.max_epochs, "cpus_per_worker": cpus_per_worker,
                     "loader_workers": workers, **run.hardware,
                     "pipeline_cycle_ips": Summary.of(run.cycle_ips).to_dict(),
                     "pipeline_compute_ips": Summary.of(run.compute_ips).to_dict(),
                     "between_epochs_s": Summary.of(run.between_epochs_s).to_dict(),
                     "loader_ips": Summary.of(loader).to_dict(), "bare_step": bare,
                     "cycle_vs_bare": Summary.of([r / bare_ips for r in run.cycle_ips]).to_dict(),
                     "loader_vs_bare": float(Summary.of(loader).median) / bare_ips, "wall_s": run.wall_s})
        print(f"{name}, loader_workers {workers}: pipeline {Summary.of(run.cycle_ips).text(1)} img/s, "
              f"data path {Summary.of(loader).text(1)}, bare step {bare_ips:.1f}", flush=True)
    return rows


def gpu_section(*, batch: int, steps: int, repeats: int, compile_model: bool,
                pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The GPU figures, or ``{"skipped": reason}`` without CUDA.

    ``pipeline`` (keyword arguments of ``pipeline_on_gpu`` but the backbone's): also time each model
    through the engine's GPU path.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    matmul = matmul_rate(threads=1, size=8192, repeats=max(repeats, 3), dtype=torch.bfloat16, device="cuda")
    peak = float(Summary.of(matmul).median)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "bf16_matmul_tflops": Summary.of([r / 1e12 for r in matmul]).to_dict(), "models": []}
    for name, entry in MODELS.items():
        variants = [False, True] if compile_model else [False]
        for compiled in variants:
            out["models"].append(_throughput(name, entry, batch=batch, steps=steps, repeats=repeats,
                                             compile_model=compiled, peak=peak))
            torch.cuda.empty_cache()
    if pipeline is not None:
        out["pipeline"] = [row for name, entry in MODELS.items()
                           for row in pipeline_on_gpu(name, entry, peak=peak, **pipeline)]
    return out


def loader_choices(raw: str | None, cpus_per_worker: float) -> list[int]:
    """``--loader-workers``: the values given, or the CPU default (0) and all but one of the worker's CPUs."""
    if raw:
        return [int(v) for v in raw.split(",")]
    return sorted({0, max(1, int(cpus_per_worker) - 1)})


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gpu``: the GPU section alone -> ``<out>/gpu.{json,md}``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params.yaml whose finetune protocol is used")
    parser.add_argument("--batch", type=int, default=64, help="bare-step batch (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the bare step (default %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also time the bare step under torch.compile")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the engine's GPU path")
    parser.add_argument("--pipeline-steps", type=int, default=PIPELINE_STEPS,
                        help="optimiser steps per epoch of the pipeline run (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=PIPELINE_EPOCHS,
                        help="pipeline epochs, 2 of them warm-up (default %(default)s)")
    parser.add_argument("--cpus-per-worker", type=float, default=8.0,
                        help="CPUs of the Ray worker, its data path's threads (default %(default)s)")
    parser.add_argument("--loader-workers", default=None,
                        help="comma-separated ray.loader_workers values of the pipeline runs "
                             "(default: 0 and cpus-per-worker - 1)")
    parser.add_argument("--loader-passes", type=int, default=2, help="timed passes over the data path")
    parser.add_argument("--out", default="reports/bench", help="output directory (default %(default)s)")
    args = parser.parse_args(argv)
    settings = load_settings(args.params)
    pipeline = None
    root = Path(tempfile.mkdtemp(prefix="transferbench-gpu-"))
    if not args.no_pipeline and torch.cuda.is_available():
        connect(None, num_cpus=int(args.cpus_per_worker) + 1)
        pipeline = {"protocol": pipeline_protocol(settings.finetune, args.epochs), "root": root,
                    "steps": args.pipeline_steps, "cpus_per_worker": args.cpus_per_worker, "loader_passes": args.loader_passes,
                    "loader_workers": loader_choices(args.loader_workers, args.cpus_per_worker),
                    "report_interval_s": settings.ray.report_interval_s}
    try:
        section = gpu_section(batch=args.batch, steps=args.steps, repeats=args.repeats, compile_model=args.compile,
                              pipeline=pipeline)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    section["command"] = " ".join(["python -m benchmarks.gpu", *sys.argv[1:]])
    out = Path(args.out)
    report.write_atomic(out / "gpu.json", json.dumps(section, indent=2) + "\n")
    report.write_atomic(out / "gpu.md", "\n".join(["# transferbench GPU benchmark", "", *report.gpu_lines(section)]))
    print("\n".join(report.gpu_lines(section)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
