"""What deterministic algorithms cost a training step: ``torch.use_deterministic_algorithms`` on vs off.

The engine trains with them on (warn-only), so that a rerun gives the same metrics, which the drift
gate relies on; a hand-written loop usually leaves them off. ``python -m benchmarks.determinism
--model resnet18`` times the same timm step (random init, synthetic batch) with the switch off and
on, alternated in one process, and prints img/s of each and the ratio on/off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch


def step_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
              steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * len(images) / (time.perf_counter() - started)


def measure(model_name: str, *, img_size: int, batch: int, steps: int, pairs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=2).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, targets = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 2, (batch,))
    before = torch.are_deterministic_algorithms_enabled()
    step_rate(model, optimizer, images, targets, 2)  # warm-up
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(pairs):
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic, warn_only=True)
                rates[deterministic].append(step_rate(model, optimizer, images, targets, steps))
    finally:
        torch.use_deterministic_algorithms(before)
    return {"model": model_name, "img_size": img_size, "batch": batch, "threads": threads,
            "off_ips": rates[False], "on_ips": rates[True],
            "on_over_off": statistics.median(rates[True]) / statistics.median(rates[False])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.determinism", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a timm model name (default %(default)s)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="steps per timing (default %(default)s)")
    p.add_argument("--pairs", type=int, default=4, help="off/on pairs (default %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    result = measure(args.model, img_size=args.img_size, batch=args.batch, steps=args.steps, pairs=args.pairs,
                     threads=args.threads)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
