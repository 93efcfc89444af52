"""``python -m benchmarks.run``: every figure of issue #8 in one run -> ``reports/bench/bench.{json,md}``.

Order of the run (one process; Ray started once):
1. the machine's dense fp32 rates, matmul and convolutions (the best is the CPU ceiling);
2. ``ray.init`` and a no-op TorchTrainer (Ray start-up, and the torch threads a worker gets);
3. per backbone of the chosen presets: training FLOPs per image, then pipeline (A), plain
   loop (B) and the engine's loop alone (C) alternated A B C A B C ``--repeats`` times, then the
   data path alone;
4. scaling: the pipeline with 1 vs 2 Ray workers of 1 CPU each;
5. no-op ``dvc repro`` (when ``dvc status`` is clean), the CI smoke study (``--with-smoke-study``);
6. the GPU section (skipped, and said so, without CUDA): the bare step, and the engine's GPU path
   (``python -m benchmarks.gpu`` runs it alone).

``--quick`` (tiny preset, 64 px, 4 steps/epoch, 1 repeat) checks that everything runs in a
few minutes; its ratios are dominated by per-epoch costs that a real epoch amortises.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import gpu, overhead, report, threads, training
from benchmarks.stats import Summary
from transferbench.config import load_settings

# Pipeline/plain in every A/B pair: with Ray Train worker actors (issue #8), and in local mode, where
# the engine trains in the same main thread as the plain loop (issue #19).
TARGET_RATIO = {"workers": 0.95, "local": 0.98}


def target_ratio(pipeline_workers: int) -> float:
    return TARGET_RATIO["local" if pipeline_workers == 0 else "workers"]
TARGET_LOADER_HEADROOM = 2.0
QUICK = {"presets": "tiny", "img_size": 64, "steps": 4, "epochs": 4, "repeats": 1, "matmul_size": 1024,
         "loader_passes": 1, "gpu_steps": 5}
FULL = {"presets": "small,tiny", "img_size": 224, "steps": 10, "epochs": 4, "repeats": 3, "matmul_size": 2048,
        "loader_passes": 3, "gpu_steps": 20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset, 64 px, few steps, 1 repeat (minutes)")
    p.add_argument("--params", default="params.yaml", help="params.yaml whose protocol/backbones are used")
    p.add_argument("--presets", help=f"comma-separated backbone presets (default {FULL['presets']})")
    p.add_argument("--backbones", help="comma-separated backbone names (overrides --presets)")
    p.add_argument("--img-size", type=int, help=f"input side in px (default {FULL['img_size']})")
    p.add_argument("--batch-size", type=int, help="training batch (default finetune.batch_size)")
    p.add_argument("--steps", type=int, help=f"optimiser steps per epoch (default {FULL['steps']}; even)")
    p.add_argument("--epochs", type=int, help=f"epochs per run, the first not counted (default {FULL['epochs']})")
    p.add_argument("--repeats", type=int, help=f"A/B pairs per backbone (default {FULL['repeats']})")
    p.add_argument("--pipeline-workers", type=int, default=0,
                   help="the pipeline arm's ray.num_workers: 0 Ray Train local mode (the smoke study's setting, "
                        "default), 1 one Ray Train worker actor")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPUs of the Ray worker = torch threads of the plain loop (default: all, %(default)s)")
    p.add_argument("--matmul-size", type=int,
                   help=f"matmul side, one of the ceiling's kernels (default {FULL['matmul_size']})")
    p.add_argument("--loader-passes", type=int, help="timed passes over the data path")
    p.add_argument("--scaling-backbone", help="backbone of the 1-vs-2-worker run (default: the first one)")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1-vs-2-worker run")
    p.add_argument("--no-dvc", action="store_true", help="do not run dvc status / no-op dvc repro")
    p.add_argument("--with-smoke-study", action="store_true",
                   help="also time the CI smoke study (`make repro`'s `with-ray -- dvc repro` in a temporary "
                        "clone; ~15 min on 2 cores)")
    p.add_argument("--compile", action="store_true", help="GPU section: also time torch.compile")
    p.add_argument("--gpu-batch", type=int, default=64, help="GPU section batch (default %(default)s)")
    p.add_argument("--gpu-steps", type=int, help="GPU section timed steps per repeat")
    p.add_argument("--no-gpu-pipeline", action="store_true",
                   help="GPU section: skip the engine's GPU path (Ray Train worker with a GPU), time the bare step only")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--out", default="reports/bench", help="output directory (default %(default)s)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 3:
        p.error("--epochs must be at least 3 (epochs 1-2 are warm-up for the epoch-cycle figure)")
    return args


def machine_info(threads: int) -> dict[str, Any]:
    import mlflow
    import ray
    import timm
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "ray": ray.__version__, "mlflow": mlflow.__version__, "cuda": torch.cuda.is_available()}


def _median(values: list[float]) -> float:
    return float(Summary.of(values).median) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.params)
    catalogue = settings.presets()
    names = (args.backbones.split(",") if args.backbones
             else [n for preset in args.presets.split(",") for n in catalogue.get(preset, ())])
    protocol = settings.finetune.model_copy(update={
        "mode": "full", "warmup_iters": 0, "max_epochs": args.epochs, "early_stop_patience": args.epochs + 1,
        "img_size": args.img_size, "batch_size": args.batch_size or settings.finetune.batch_size})
    batch = protocol.batch_size
    tracking = settings.tracking
    notes: list[str] = [
        "Backbones use random initialisation (weights: none); `small` entries normally load hub weights.",
        "Protocol as params.yaml finetune, except warmup_iters 0 (the whole network trains every step) and "
        "max_epochs = --epochs. MLflow system metrics "
        f"{'on' if tracking.system_metrics else 'off'}, model logging {'on' if tracking.log_model else 'off'} "
        "(tracking section of params.yaml), a Ray checkpoint every epoch.",
        "Pipeline img/s (epoch cycle) = train images of epoch k / interval between the MLflow train_loss "
        "timestamps of epochs k-1 and k: steps, an 8-image val pass, epoch k-1's checkpoint and MLflow logging. "
        "Epochs 1-2 are not counted (warm-up, first checkpoint); the compute figure skips epoch 1.",
    ]
    bench: dict[str, Any] = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "config": {"mode": "quick" if args.quick else "full", "presets": args.presets.split(","),
                   "backbones": names, "img_size": args.img_size, "batch_size": batch, "steps": args.steps,
                   "epochs": args.epochs, "repeats": args.repeats, "threads": args.threads,
                   "matmul_size": args.matmul_size, "pipeline_workers": args.pipeline_workers,
                   "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]])},
    }
    print(f"benchmark: {len(names)} backbones {names}, {args.img_size} px, batch {batch}", flush=True)

    dense = training.dense_rates(threads=args.threads, matmul_size=args.matmul_size,
                                 repeats=max(args.repeats, 3) + 2)
    ceiling_kernel = max(dense, key=lambda k: _median(dense[k]))
    peak = _median(dense[ceiling_kernel])
    bench["ceiling"] = {"kernels": {k: Summary.of([r / 1e9 for r in v]).to_dict() for k, v in dense.items()},
                        "kernel": ceiling_kernel, "gflops": peak / 1e9, "dtype": "float32",
                        "conv_shapes": {name: {"batch": b, "channels": c, "side": h, "kernel": k}
                                        for name, b, c, h, k in training.CONV_KERNELS}}
    print("dense fp32: " + ", ".join(f"{k} {_median(v) / 1e9:.1f}" for k, v in dense.items())
          + f" GFLOP/s; ceiling {ceiling_kernel}", flush=True)

    with tempfile.TemporaryDirectory(prefix="transferbench-bench-") as tmp:
        root = Path(tmp)
        splits_dir = training.write_task(root, n_train=args.steps * batch, n_eval=8,
                                         side=round(args.img_size / 0.85))
        tracking_uri = f"sqlite:///{root / 'mlruns.db'}"
        ray_init_s = overhead.ray_init(address=args.ray_address, num_cpus=max(os.cpu_count() or 1, 2))
        startups, view, phases = [], {}, {k: [] for k in overhead.STARTUP_PHASES}
        for _ in range(args.repeats):
            seconds, view = overhead.ray_worker_startup(storage=root / "ray_results", num_workers=1,
                                                        cpus_per_worker=float(args.threads))
            startups.append(seconds)
            for key, values in phases.items():
                values.append(view[key])
        helper_runs = [overhead.ray_train_helpers(storage=root / "ray_results", cpus_per_worker=float(args.threads),
                                                  window_s=5.0 if args.quick else 15.0)
                       for _ in range(args.repeats)]
        if view.get("torch_threads") != args.threads:
            notes.append(f"The Ray worker ran torch with {view.get('torch_threads')} threads for "
                         f"{args.threads} CPUs (OMP_NUM_THREADS={view.get('omp_num_threads')}).")

        rows, data_rows, pipeline_runs = [], [], []
        for name in names:
            work = training.prepare(name, settings.backbone(name), protocol, splits_dir=splits_dir,
                                    cache_dir=root / "cache")
            flops = training.train_flops_per_image(work)
            print(f"{name}: {flops / 1e9:.3f} GFLOP/img (train); A/B x{args.repeats}", flush=True)
            pipeline, plain, engine = training.alternate(
                work, repeats=args.repeats, epochs=args.epochs, threads=args.threads,
                cpus_per_worker=float(args.threads), root=root, tracking_uri=tracking_uri,
                system_metrics=tracking.system_metrics, log_model=tracking.log_model,
                report_interval_s=settings.ray.report_interval_s, pipeline_workers=args.pipeline_workers)
            pipeline_runs += pipeline
            cycle = [v for run in pipeline for v in run.cycle_ips]
            compute = [v for run in pipeline for v in run.compute_ips]
            plain_ips = [v for run in plain for v in run]
            ratios = training.pair_ratios(pipeline, plain)
            factors = training.gap_factors(pipeline, plain, engine)
            preset = settings.backbone(name).preset
            rows.append({
                "backbone": name, "model": work.entry.model, "preset": preset, "family": work.entry.family,
                "weights": "none (random init)", "img_size": args.img_size, "batch_size": batch,
                "threads": args.threads, "pipeline_ips": Summary.of(cycle).to_dict(),
                "pipeline_compute_ips": Summary.of(compute).to_dict(), "plain_ips": Summary.of(plain_ips).to_dict(),
                "engine_ips": Summary.of([v for run in engine for v in run.compute_ips]).to_dict(),
                "ratio": Summary.of(ratios).to_dict(), "train_gflops_per_image": flops / 1e9,
                "factors": {k: Summary.of(v).to_dict() for k, v in factors.items()},
                "between_epochs_s": Summary.of([v for run in pipeline for v in run.between_epochs_s]).to_dict(),
                "pipeline_fraction_of_ceiling": Summary.of([v * flops / peak for v in cycle]).to_dict(),
                "plain_fraction_of_ceiling": Summary.of([v * flops / peak for v in plain_ips]).to_dict(),
                "meets_target": bool(ratios) and min(ratios) >= target_ratio(args.pipeline_workers),
            })
            loader = training.loader_rate(work, threads=args.threads, passes=args.loader_passes)
            consumption = _median(plain_ips)
            data_rows.append({"backbone": name, "preset": preset, "loader_ips": Summary.of(loader).to_dict(),
                              "consumption_ips": Summary.of(plain_ips).to_dict(),
                              "headroom": Summary.of([v / consumption for v in loader]).to_dict(),
                              "meets_target": _median(loader) >= TARGET_LOADER_HEADROOM * consumption})
            print(f"{name}: pipeline {_median(cycle):.1f} img/s, plain {_median(plain_ips):.1f} img/s, "
                  f"ratio {_median(ratios):.3f}, loader {_median(loader):.0f} img/s", flush=True)
        bench["training"], bench["data_path"] = rows, data_rows
        # Why a Ray Train worker trains slower than the same loop in a main thread (see threads.py).
        thread_model = settings.backbone(names[0]).model
        measured = threads.measure(thread_model, img_size=args.img_size, batch=batch, threads=args.threads,
                                   pairs=max(2 * args.repeats, 2), seconds=4.0 if args.quick else 8.0)
        bench["thread_cost"] = {"model": thread_model, "img_size": args.img_size, "batch_size": batch}
        for label, result in measured.items():
            bench["thread_cost"][label] = {k: Summary.of(result[k]).to_dict()
                                           for k in ("main_ips", "thread_ips", "ratios")}
        print(f"thread cost ({thread_model}): thread/main "
              f"{bench['thread_cost']['default']['ratios']['median']:.3f} with glibc's default arenas, "
              f"{bench['thread_cost']['one_arena']['ratios']['median']:.3f} with MALLOC_ARENA_MAX=1", flush=True)

        scaling: dict[str, Any] = {"backbone": args.scaling_backbone or names[0], "runs": []}
        if not args.no_scaling:
            work = training.prepare(scaling["backbone"], settings.backbone(scaling["backbone"]), protocol,
                                    splits_dir=splits_dir, cache_dir=root / "cache")
            base = None
            for workers in (1, 2):
                runs = [training.run_pipeline(work, root=root, tracking_uri=tracking_uri, num_workers=workers,
                                              cpus_per_worker=1.0, system_metrics=tracking.system_metrics,
                                              log_model=tracking.log_model,
                                              report_interval_s=settings.ray.report_interval_s)
                        for _ in range(args.repeats)]
                ips = [v for run in runs for v in run.cycle_ips]
                base = base or _median(ips)
                scaling["runs"].append({"num_workers": workers, "cpus_per_worker": 1.0,
                                        "images_per_s": Summary.of(ips).to_dict(),
                                        "speedup": Summary.of([v / base for v in ips]).to_dict()
                                        if workers > 1 else None})
                print(f"scaling: {workers} worker(s) x 1 CPU: {_median(ips):.1f} img/s", flush=True)
        else:
            scaling["skipped"] = "--no-scaling"
        bench["scaling"] = scaling
        import ray

        ray.shutdown()

    bench["overhead"] = {
        "ray_init_s": Summary.of([ray_init_s]).to_dict(),
        "ray_worker_startup_s": Summary.of(startups).to_dict(),
        **{f"ray_{k}": Summary.of(v).to_dict() for k, v in phases.items()},
        "ray_worker_view": {k: v for k, v in view.items() if k in ("torch_threads", "omp_num_threads")},
        "ray_train_helpers": overhead.summarise_helpers(helper_runs),
        "mlflow_setup_s": Summary.of([r.mlflow_setup_s for r in pipeline_runs]).to_dict(),
        "finetune_wall_s": Summary.of([r.wall_s for r in pipeline_runs]).to_dict(),
        "finetune_compute_s": Summary.of([r.compute_s for r in pipeline_runs]).to_dict(),
        "finetune_setup_s": Summary.of([r.wall_s - r.compute_s for r in pipeline_runs]).to_dict(),
        "dvc_noop": {"not_measured": "--no-dvc"} if args.no_dvc
        else overhead.dvc_noop(Path.cwd(), repeats=max(args.repeats, 1)),
        "smoke_study": overhead.smoke_study(Path.cwd(), mirror=os.environ.get("TRANSFERBENCH_DATA_MIRROR"))
        if args.with_smoke_study else {"not_measured": "opt-in: --with-smoke-study (~15 min on 2 cores)"},
    }
    noop = bench["overhead"]["dvc_noop"]
    if "seconds" in noop:
        noop["seconds"] = Summary.of(noop["seconds"]).to_dict()
    with tempfile.TemporaryDirectory(prefix="transferbench-gpu-") as tmp:
        gpu_pipeline = None if args.no_gpu_pipeline else {
            "protocol": gpu.pipeline_protocol(settings.finetune), "root": Path(tmp), "steps": gpu.PIPELINE_STEPS,
            "cpus_per_worker": float(args.threads), "loader_passes": args.loader_passes,
            "loader_workers": gpu.loader_choices(None, float(args.threads)),
            "report_interval_s": settings.ray.report_interval_s}
        bench["gpu"] = gpu.gpu_section(batch=args.gpu_batch, steps=args.gpu_steps, repeats=max(args.repeats, 3),
                                       compile_model=args.compile, pipeline=gpu_pipeline)
    notes += closing_notes(bench)
    bench["notes"] = notes
    json_path, md_path = report.write(bench, Path(args.out))
    print(f"wrote {json_path} and {md_path}")
    return 0


def closing_notes(bench: dict[str, Any]) -> list[str]:
    """What costs the pipeline its throughput, per backbone below the target, from the measured split."""
    notes = []
    helpers = bench["overhead"].get("ray_train_helpers", {}).get("machine_share", {}).get("median")
    for r in bench["training"]:
        ratio, cycle, compute, plain = (r[k]["median"] for k in ("ratio", "pipeline_ips", "pipeline_compute_ips",
                                                                 "plain_ips"))
        if ratio is None or r["meets_target"]:  # the table's criterion: every pair at or above the target
            continue
        low = r["ratio"]["min"]
        f = {k: v["median"] for k, v in r.get("factors", {}).items()}
        where = ("Ray Train local mode, the benchmark's main thread" if bench["config"].get("pipeline_workers") == 0
                 else "a Ray Train worker")
        if f.get("loop_code") is not None:
            split = (
                f"Of the gap, as a product of three factors measured in the same rounds (medians): the engine's "
                f"loop code alone in a plain process (engine classifier and loaders, per-step freeze/lr "
                f"bookkeeping, the val pass, which takes {f['val_share']:.1%} of its epoch) runs at "
                f"{f['loop_code']:.1%} of the plain loop; the same loop in the pipeline ({where}) at "
                f"{f['ray_worker']:.1%} of that (Ray Train's and MLflow's threads and, with worker actors, the "
                f"worker's training thread and Ray Train's helper processes); and the per-epoch checkpoint + MLflow "
                f"logging leave "
                f"{f['per_epoch']:.1%} of the loop's rate. ")
        else:  # no round had figures from all three arms: the two-way split the pipeline's own clocks give
            split = (
                f"Of the gap, {1 - cycle / compute:.1%} of the epoch cycle is outside loop.fit's epoch (checkpoint "
                f"torch.save + ray.train.report, MLflow log_metrics), and loop.fit's own epoch (steps + the val "
                f"pass, metric gathering, per-step freeze/lr bookkeeping) runs at {compute / plain:.1%} of the "
                f"plain loop's rate. ")
        notes.append(
            f"{r['backbone']} ({r['preset']}): ratio {ratio:.4f} (median; lowest pair {low:.4f}), target: every pair "
            f">= {target_ratio(bench['config'].get('pipeline_workers', 1))}. " + split
            + ("These are per-epoch costs: a real epoch (hundreds of steps) amortises them; this run's epochs "
               f"have only {bench['config']['steps']} steps. " if r["preset"] == "tiny" or
               bench["config"]["mode"] == "quick" else "")
            + (f"Ray Train's helper processes (controller, placement-group cleaner, preemption watcher, ...) "
               f"took {helpers:.1%} of the machine's CPU beside a worker actor (section 4; local mode starts none); "
               f"Ray Train starts "
               "them for every run, and only the preemption watcher has a switch "
               "(RAY_TRAIN_ENABLE_PREEMPTION_WATCHER). When torch's threads take every core, as here, that CPU "
               "comes out of the step, which they also preempt (benchmarks/README, session 12: the plain loop "
               "ran at 0.96 of a main thread's speed in a Ray Train worker with 2 threads on 2 cores, at 1.04 "
               "with 1 thread)." if helpers is not None and bench["config"].get("pipeline_workers", 1) else ""))
    t = bench.get("thread_cost")
    if t:
        notes.append(
            f"Training thread ({t['model']}): Ray Train calls the training function in a second thread of the "
            f"worker process. With glibc's default per-thread malloc arenas that thread ran at "
            f"{t['default']['ratios']['median']:.3f} of the main thread's speed (every activation over 64 MB is "
            f"mmap'd and page-faulted afresh each step); with MALLOC_ARENA_MAX=1, which the engine sets for its "
            f"workers, at {t['one_arena']['ratios']['median']:.3f}.")
    if bench["gpu"].get("skipped"):
        notes.append(f"GPU section skipped: {bench['gpu']['skipped']}.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
