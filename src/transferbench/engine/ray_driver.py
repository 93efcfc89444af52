"""The fine-tuning loop on Ray Train, the driver's side: scaling, DDP, checkpoints, recovery.

``fit_on_ray`` hands a ``WorkerSpec`` to ``train_worker``, which runs ``ray_worker.run`` in each
training process (the worker's code is imported there, not here: Ray Train's controller
unpickles ``train_worker`` by reference to this module, which stays free of torchvision,
scikit-learn and matplotlib).

- ``ray.num_workers: 0`` is Ray Train's local mode: ``ScalingConfig(num_workers=0)`` runs the
  training function in the calling process and thread, with the same ``ray.train`` API and no
  cluster, controller or actors. What local mode does not provide (storage context, node id,
  checkpoint state across processes, checkpoint pruning) ``ray_worker`` does itself.
- ``ray.num_workers >= 1``: a ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu,
  {"CPU": cpus_per_worker}, placement_strategy)``; DDP via Ray's prepare helpers. One CPU
  worker, several, or GPUs on many nodes: only params change. ``ray.min_workers`` below it is
  elastic training.
- Every epoch each rank calls ``ray.train.report``; rank 0 attaches the epoch's checkpoint.
  ``CheckpointConfig`` keeps the best ``ray.checkpoints_to_keep`` by the task kind's selection
  metric (Ray also keeps the latest, for recovery).
- Recovery: ``FailureConfig(ray.max_failures)`` restarts killed workers, which resume from
  ``ray.train.get_checkpoint()``; a killed driver is resumed by running the same command again,
  because the run name and storage path are deterministic and Ray Train reloads that run's
  checkpoint state. Local mode resumes from the run directory (``checkpoints.latest_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transferbench.engine.spec import FINAL_FILE, REPORT_INTERVAL_ENV, WORKER_ENV, WorkerSpec


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: ``ray_worker.run``, imported here, in the training process."""
    from transferbench.engine import ray_worker

    ray_worker.run(config["spec"])


def fit_on_ray(spec: WorkerSpec, *, run_name: str, storage_path: str) -> dict[str, Any]:
    """Run ``train_worker`` under a TorchTrainer as ``spec.ray`` says; returns rank 0's outcome (``final.json``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray = spec.ray
    if ray.local_mode:
        # Local mode logs every ray.train.report's metrics at INFO (a dict per epoch on the console);
        # the run's metrics go to MLflow, so only Ray Train's warnings are shown.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        TorchTrainer(train_worker, train_loop_config={"spec": spec}, scaling_config=ScalingConfig(num_workers=0),
                     run_config=RunConfig(name=run_name, storage_path=storage_path)).fit()
        return json.loads((Path(spec.run_dir) / FINAL_FILE).read_text())
    # Ray Train copies this from the driver's environment to its controller and workers; the stage is
    # a process of its own, so it is set for the process, as Ray reads it.
    os.environ[REPORT_INTERVAL_ENV] = repr(float(ray.report_interval_s))
    selection = spec.kind.selection
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=ray.scaling_workers, use_gpu=ray.use_gpu,
                                     resources_per_worker={"CPU": ray.cpus_per_worker},
                                     placement_strategy=ray.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, worker_runtime_env={"env_vars": dict(WORKER_ENV)},
            failure_config=FailureConfig(max_failures=ray.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=ray.checkpoints_to_keep, checkpoint_score_attribute=f"val_{selection.name}",
                checkpoint_score_order="max" if selection.higher_is_better else "min")))
    trainer.fit()
    return json.loads((Path(spec.run_dir) / FINAL_FILE).read_text())
