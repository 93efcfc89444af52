"""What the Ray driver hands each training process, and the run directory's file names.

Imported by both sides (``ray_driver`` and ``ray_worker``), which import nothing of each other.
It imports no library at run time: Ray Train's controller imports ``ray_driver`` (and so this
module) at every run's start, and torch, timm or pydantic would make that start slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferbench.config import (BackboneSettings, FinetuneSettings, RaySettings, TaskSettings,
                                      TrackingSettings)
    from transferbench.engine.tasks import TaskKind
    from transferbench.models import InputSpec

STATE_FILE = "state.pt"  # a checkpoint's state, in <run_dir>/epoch_NNNN/
FINAL_FILE = "final.json"  # rank 0's outcome: history, best epoch, val/test metrics, hardware
# What rank 0 really trained on, in final.json (ray_worker.hardware): device, precision, channels_last.
HARDWARE_KEYS = ("device", "precision", "channels_last", "threads")
# Ray Train's controller poll interval; Ray copies it from the driver's environment to the
# controller and the workers (ray.train.v2 ENV_VARS_TO_PROPAGATE).
REPORT_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Environment of Ray Train worker processes, read when a process starts:
# - Ray Train runs the training function in a thread of the worker process, where glibc's
#   per-thread malloc arena mmaps and page-faults every large activation afresh each step; one
#   arena and fixed mmap/trim thresholds keep freed memory for reuse, as a main thread does
#   (benchmarks/README.md, "training thread"). The cost: a worker keeps up to 1 GiB of freed heap.
# - cuBLAS is deterministic only with a fixed workspace; the workers run with deterministic algorithms.
WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
              "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(64 << 20),
              "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass(frozen=True)
class WorkerSpec:
    """One run, as plain picklable values with absolute paths; each setting section travels whole."""

    task: str
    backbone_name: str
    backbone: BackboneSettings
    protocol: FinetuneSettings
    kind: TaskKind
    # what rebuilds ``kind`` (``kind_for_task``) for the served model: the task's settings and its split summary
    task_settings: TaskSettings
    summary: dict[str, Any]
    seed: int
    img_size: int
    input_spec: InputSpec
    cache_files: dict[str, str]  # split -> decoded image cache
    filenames: dict[str, tuple[str, ...]]  # split -> the manifest's image files, in cache order
    run_dir: str
    ray: RaySettings
    tracking: TrackingSettings
    tracking_uri: str  # resolved: $MLFLOW_TRACKING_URI, else tracking.tracking_uri, made absolute
    mlflow_run_id: str


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def per_worker_batch(global_batch: int, world_size: int) -> int:
    """Each worker's share of the global batch (at least 1; the remainder of an uneven split is dropped)."""
    return max(1, global_batch // world_size)
