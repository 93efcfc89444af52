"""What a training *thread* costs: the same timm step in the main thread vs another thread.

Ray Train (v2) runs the training function in a thread of the worker process, not in its main
thread. With glibc, that thread gets its own malloc arena made of 64 MB mmap'd heaps, so every
allocation bigger than that (ResNet-18's first feature map at batch 32, 224 px is ~100 MB) is
mmap'd, page-faulted and unmapped again on every step, where the main thread's arena reuses
freed memory. ``measure`` times the step in both threads, alternated in one process, once with
glibc's default arenas and once with ``MALLOC_ARENA_MAX=1`` (one arena for every thread, which
is what the engine sets for its Ray Train workers); each in a fresh interpreter, because glibc
reads the variable at start-up.

Run alone: ``python -m benchmarks.threads [--model resnet18] [--pairs 6] [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

ARENA_ENV = "MALLOC_ARENA_MAX"


def _rates(model: str, *, img_size: int, batch: int, threads: int, pairs: int, seconds: float) -> dict[str, Any]:
    """In this process: step images/s in the main thread and in a new thread, ``pairs`` alternations."""
    import timm
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = timm.create_model(model, pretrained=False, num_classes=2).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    images, targets = torch.randn(batch, 3, img_size, img_size), torch.arange(batch) % 2

    def timed(out: list[float], span: float) -> None:
        rates, started = [], time.perf_counter()
        while time.perf_counter() - started < span:
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            rates.append(batch / (time.perf_counter() - t))
        out.append(statistics.median(rates))

    timed([], seconds / 2)  # warm-up
    main, other = [], []
    for _ in range(pairs):
        timed(main, seconds)
        worker = threading.Thread(target=timed, args=(other, seconds))
        worker.start()
        worker.join()
    return {"main_ips": main, "thread_ips": other, "ratios": [b / a for a, b in zip(main, other, strict=True)],
            "malloc_arena_max": os.environ.get(ARENA_ENV)}


def measure(model: str = "resnet18", *, img_size: int = 224, batch: int = 32, threads: int = 2, pairs: int = 6,
            seconds: float = 8.0) -> dict[str, Any]:
    """Both glibc settings, each in a fresh interpreter: {"default": {...}, "one_arena": {...}}."""
    out = {}
    for label, extra in (("default", {}), ("one_arena", {ARENA_ENV: "1"})):
        env = {k: v for k, v in os.environ.items() if k != ARENA_ENV} | extra
        command = [sys.executable, "-m", "benchmarks.threads", "--json", "--model", model, "--img-size", str(img_size),
                   "--batch", str(batch), "--threads", str(threads), "--pairs", str(pairs), "--seconds", str(seconds)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        out[label] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--json", action="store_true", help="this process only, one JSON line (used by measure)")
    args = p.parse_args(argv)
    kwargs = {"img_size": args.img_size, "batch": args.batch, "threads": args.threads, "pairs": args.pairs,
              "seconds": args.seconds}
    if args.json:
        print(json.dumps(_rates(args.model, **kwargs)))
        return 0
    for label, result in measure(args.model, **kwargs).items():
        ratios = result["ratios"]
        print(f"{label:9s} thread/main img/s: median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}-{max(ratios):.3f}] (n={len(ratios)}); main median "
              f"{statistics.median(result['main_ips']):.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
