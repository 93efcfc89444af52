"""GPU ceiling (issue #8, item 5): bf16 training throughput of paper-scale backbones vs the GPU's matmul rate.

Runs only where CUDA is present; elsewhere it returns ``{"skipped": ...}``. For ViT-B/16 and
ResNet-50 (random init, 224 px) it times the engine's training step as ``loop.fit`` runs it on
GPU (the engine's classifier, Adam, label-smoothed cross-entropy, bf16 autocast, channels-last
input and weights for the ConvNet), optionally under ``torch.compile``, on synthetic on-device
batches (the data path is measured on CPU, item 3). Achieved TFLOP/s = training FLOPs per image
(``FlopCounterMode``) x images/s, as a fraction of the measured dense bf16 matmul rate.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.stats import Summary
from benchmarks.training import matmul_rate
from transferbench.config import BackboneSettings
from transferbench.models import build_classifier

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
                compile_model: bool, peak: float) -> dict[str, Any]:
    torch.manual_seed(0)
    channels_last = entry.family == "convnet"
    model = build_classifier(entry, num_classes=1000, img_size=224, dropout=0.2).cuda().train()
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


def gpu_section(*, batch: int, steps: int, repeats: int, compile_model: bool) -> dict[str, Any]:
    """The GPU figures, or ``{"skipped": reason}`` without CUDA."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    matmul = matmul_rate(threads=1, size=8192, repeats=max(repeats, 3), dtype=torch.bfloat16, device="cuda")
    peak = float(Summary.of(matmul).median)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0),
                           "bf16_matmul_tflops": Summary.of([r / 1e12 for r in matmul]).to_dict(), "models": []}
    for name, entry in MODELS.items():
        variants = [False, True] if compile_model else [False]
        for compiled in variants:
            out["models"].append(_throughput(name, entry, batch=batch, steps=steps, repeats=repeats,
                                             compile_model=compiled, peak=peak))
            torch.cuda.empty_cache()
    return out
