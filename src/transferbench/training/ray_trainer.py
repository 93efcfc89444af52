"""The fine-tuning loop on Ray Train: scaling, DDP, per-epoch checkpoints, recovery.

This module is the driver's side (``fit_on_ray``, the ``WorkerSpec`` it hands the workers);
what each worker runs is ``ray_worker``, imported only inside the workers.

- ``ray.num_workers: 0`` is Ray Train's local mode: ``ScalingConfig(num_workers=0)`` runs the
  training function in the calling process and thread, with the same ``ray.train`` API and no
  cluster, controller or actors. What local mode does not provide (storage context, node id,
  checkpoint state across processes, checkpoint pruning) ``ray_worker`` does itself.
- ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu, {"CPU": cpus_per_worker})``
  from ``params.yaml`` ``ray``; DDP via ``ray.train.torch.prepare_model`` /
  ``prepare_data_loader``. One CPU worker, several, or GPUs on many nodes: only params change.
- Every epoch each rank calls ``ray.train.report``; rank 0 attaches a checkpoint
  (``epoch_NNNN/state.pt``: model, optimiser, scheduler, loop state). ``CheckpointConfig``
  keeps the best by val loss (Ray also keeps the latest, for recovery).
- Recovery: ``FailureConfig(max_failures)`` restarts killed workers, which resume from
  ``ray.train.get_checkpoint()``; a killed driver is resumed by running the same command
  again, because the run name/storage path are deterministic and Ray Train (v2) reloads
  that run's checkpoint state. In local mode a rerun resumes from the newest complete
  checkpoint in the run directory (``ray_worker.latest_checkpoint``).
- On GPU: bf16 autocast and (ConvNets) channels-last, per ``ray.mixed_precision`` /
  ``ray.channels_last``.
- Only rank 0 talks to MLflow (``MlflowTracker`` attached to a run the driver created).

Test-only fault injection: ``WorkerSpec.kill_at_epoch`` makes one rank SIGKILL itself right
after its epoch-k checkpoint is registered, on the first attempt only (a marker file in the
run directory records that it happened).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from transferbench.config import BackboneSettings, FinetuneSettings

# Ray Train's controller poll interval; Ray copies it from the driver's environment to the
# controller and the workers (ray.train.v2 ENV_VARS_TO_PROPAGATE).
REPORT_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Environment of the training worker processes (glibc malloc, cuBLAS; read once, when the process starts).
# - Ray Train runs the training function in a thread of the worker process, not its main thread,
#   and glibc gives each such thread a malloc arena of 64 MB mmap'd heaps: every activation bigger
#   than that (ResNet-18's first feature map at batch 32 and 224 px is ~100 MB) is then mmap'd,
#   page-faulted and unmapped on every step. MALLOC_ARENA_MAX=1: one arena, the main one. Measured
#   here, the same timm step in a non-main thread ran at 0.77-0.97 of the main thread's speed
#   (median 0.86), and at 0.97-1.01 with one arena.
# - Fixed mmap/trim thresholds instead of glibc's self-adjusting ones: in a Ray Train worker the
#   step still took ~100 fresh page faults per image (test_resnet, 64 px; 3 in a plain process),
#   freed tensor memory going back to the kernel and being faulted in again. With these the faults
#   go (98 -> 0.1 per image) and the step's CPU per image matches a plain process's main thread
#   (1.70 vs 1.72 ms, one torch thread); resnet18 at 224 px, 2 threads: the pipeline went from 0.89
#   to 0.93-1.02 of the plain loop (python -m benchmarks.cpu_account; benchmarks/README.md 1c).
#   The cost: a worker keeps up to 1 GiB of freed heap instead of returning it to the kernel.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
              "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(64 << 20),
              # cuBLAS is deterministic only with a fixed workspace (read when CUDA starts); the
              # workers run with deterministic algorithms on. No effect on CPU.
              "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
STATE_FILE = "state.pt"
# What rank 0 really trained on, in final.json (ray_worker.hardware): device, precision, channels_last.
HARDWARE_KEYS = ("device", "precision", "channels_last")
FINAL_FILE = "final.json"
KILL_MARKER = "fault_injected"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain picklable values with absolute paths."""

    task: str
    backbone_name: str
    backbone: BackboneSettings
    protocol: FinetuneSettings
    classes: tuple[str, ...]
    seed: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    cache_files: dict[str, str]
    filenames: dict[str, tuple[str, ...]]
    run_dir: str
    tracking_uri: str
    mlflow_run_id: str
    system_metrics: bool = True
    log_model: bool = True
    use_gpu: bool = False
    mixed_precision: bool = True
    channels_last: bool = True
    loader_workers: int = 0
    local_mode: bool = False  # ray.num_workers 0: this process trains; no Ray cluster
    checkpoints_to_keep: int = 1  # local mode prunes its checkpoints itself (Ray Train does otherwise)
    kill_at_epoch: int | None = None
    kill_rank: int = 0


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def per_worker_batch(global_batch: int, world_size: int) -> int:
    """Each worker's share of the global batch (at least 1; the remainder of an uneven split is dropped)."""
    return max(1, global_batch // world_size)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; its code is ``ray_worker.run``, imported here, in the worker.

    Ray Train's controller unpickles this function (by reference to this module) before it starts
    the workers, so this module stays free of torch, torchvision, scikit-learn and matplotlib:
    importing them made every run's controller ~2.4 s slower to start.
    """
    from transferbench.training import ray_worker

    ray_worker.run(config)


def start_environment(keys: Iterable[str]) -> dict[str, str | None]:
    """``keys`` as this process was started with them (what glibc read), not as ``os.environ`` has them now."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:  # not Linux
        return {k: os.environ.get(k) for k in keys}
    start = dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k: start.get(k) for k in keys}


def fit_on_ray(spec: WorkerSpec, *, run_name: str, storage_path: str, num_workers: int | tuple[int, int],
               use_gpu: bool, cpus_per_worker: float, max_failures: int, checkpoints_to_keep: int,
               report_interval_s: float, placement_strategy: str = "PACK") -> dict[str, Any]:
    """Run ``train_worker`` under a TorchTrainer; returns the rank-0 outcome (``final.json``).

    ``num_workers``: a fixed count, or ``(min, max)`` for Ray Train's elastic training (a run
    that loses a node restarts from its last checkpoint with the workers that still fit).
    ``report_interval_s``: how often the controller collects the workers' reports (``ray.report_interval_s``).
    ``num_workers`` 0 (``spec.local_mode``): Ray Train local mode, ``train_worker`` in this thread; the
    other settings are for worker actors and unused.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers == 0:
        if not spec.local_mode:
            raise ValueError("num_workers 0 is local mode: the WorkerSpec must say local_mode=True")
        # Local mode logs every ray.train.report's metrics at INFO (a dict per epoch on the console);
        # the run's metrics go to MLflow, so only Ray Train's warnings are shown.
        ray_train_logger = logging.getLogger("ray.train")
        level = ray_train_logger.level
        ray_train_logger.setLevel(max(level, logging.WARNING))
        try:
            TorchTrainer(train_worker, train_loop_config={"spec": spec}, scaling_config=ScalingConfig(num_workers=0),
                         run_config=RunConfig(name=run_name, storage_path=storage_path)).fit()
        finally:
            ray_train_logger.setLevel(level)
        return json.loads((Path(spec.run_dir) / FINAL_FILE).read_text())

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker},
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, worker_runtime_env={"env_vars": dict(WORKER_ENV)},
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min")))
    with mock.patch.dict(os.environ, {REPORT_INTERVAL_ENV: repr(float(report_interval_s))}):  # restored after
        trainer.fit()
    return json.loads((Path(spec.run_dir) / FINAL_FILE).read_text())
