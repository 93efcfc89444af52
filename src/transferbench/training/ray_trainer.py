"""The fine-tuning loop on Ray Train: scaling, DDP, per-epoch checkpoints, recovery.

- ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu, {"CPU": cpus_per_worker})``
  from ``params.yaml`` ``ray``; DDP via ``ray.train.torch.prepare_model`` /
  ``prepare_data_loader``. One CPU worker, several, or GPUs on many nodes: only params change.
- Every epoch each rank calls ``ray.train.report``; rank 0 attaches a checkpoint
  (``epoch_NNNN/state.pt``: model, optimiser, scheduler, loop state). ``CheckpointConfig``
  keeps the best by val loss (Ray also keeps the latest, for recovery).
- Recovery: ``FailureConfig(max_failures)`` restarts killed workers, which resume from
  ``ray.train.get_checkpoint()``; a killed driver is resumed by running the same command
  again, because the run name/storage path are deterministic and Ray Train (v2) reloads
  that run's checkpoint state.
- On GPU: bf16 autocast and (ConvNets) channels-last, per ``ray.mixed_precision`` /
  ``ray.channels_last``.
- Only rank 0 talks to MLflow (``MlflowTracker`` attached to a run the driver created).

Test-only fault injection: ``WorkerSpec.kill_at_epoch`` makes one rank SIGKILL itself right
after its epoch-k checkpoint is registered, on the first attempt only (a marker file in the
run directory records that it happened).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from transferbench.config import BackboneSettings, FinetuneSettings
from transferbench.training import loop
from transferbench.training.data import CachedImages, eval_loader, train_loader
from transferbench.training.metrics import (
    classification_metrics,
    confusion_matrix_figure,
    learning_curve_figure,
)

# Ray Train's controller poll interval; Ray copies it from the driver's environment to the
# controller and the workers (ray.train.v2 ENV_VARS_TO_PROPAGATE).
REPORT_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# Environment of the training worker processes (glibc malloc; read once, when the process starts).
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
              "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(64 << 20)}
STATE_FILE = "state.pt"
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
    kill_at_epoch: int | None = None
    kill_rank: int = 0


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}"


def per_worker_batch(global_batch: int, world_size: int) -> int:
    """Each worker's share of the global batch (at least 1; the remainder of an uneven split is dropped)."""
    return max(1, global_batch // world_size)


def _gather(obj: Any) -> list[Any]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class _Tracking:
    """Per-epoch metrics to the tracker (rank 0), logged before the checkpoint is reported."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
        return False


class _Checkpointing:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        import ray.train

        name = checkpoint_name(int(record["epoch"]))
        if self.rank != 0:
            ray.train.report(dict(record), checkpoint=None, checkpoint_dir_name=name)
            return False
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(session.state_dict(), Path(tmp) / STATE_FILE)
            ray.train.report(dict(record), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        return False


class _FaultInjection:
    """Test-only: really kill this worker process after epoch k's checkpoint is registered."""

    def __init__(self, spec: WorkerSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        import ray.train

        marker = Path(self.spec.run_dir) / KILL_MARKER
        if int(record["epoch"]) != self.spec.kill_at_epoch or marker.exists():
            return False
        ray.train.get_all_reported_checkpoints()  # blocks until the controller has registered them
        if self.rank == self.spec.kill_rank:
            marker.write_text(f"killed rank {self.rank} (pid {os.getpid()}) after epoch {record['epoch']}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return False


def _load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    import ray
    import ray.train
    import ray.train.torch

    from transferbench.models import build_classifier
    from transferbench.training.tracking import MlflowTracker, NullTracker

    spec: WorkerSpec = config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    loop.seed_everything(spec.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    on_gpu = spec.use_gpu and device.type == "cuda"
    autocast = torch.bfloat16 if on_gpu and spec.mixed_precision else None
    channels_last = on_gpu and spec.channels_last and spec.backbone.family == "convnet"

    protocol = spec.protocol
    model = build_classifier(spec.backbone, num_classes=len(spec.classes), img_size=spec.img_size,
                             dropout=protocol.head_dropout)
    if protocol.mode == "linear_probe":  # before DDP, so DDP only syncs the head
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Warm-up freezes the backbone for some iterations: DDP must tolerate unused parameters.
    ddp_kwargs = {"find_unused_parameters": True} if protocol.mode == "full" and protocol.warmup_iters else None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    # Which Ray node each rank runs on (rank order), for the run's record: on a cluster the
    # workers of one run may sit on different machines, and change after a node is lost.
    nodes = [str(n) for n in _gather(ray.get_runtime_context().get_node_id())]

    def dataset(split: str, train: bool) -> CachedImages:
        return CachedImages(spec.cache_files[split], img_size=spec.img_size, mean=spec.mean, std=spec.std,
                            train=train, rotation_degrees=protocol.rotation_degrees, hflip=protocol.hflip)

    prepare = ray.train.torch.prepare_data_loader
    # finetune.batch_size is the global batch (the paper's 32): each of the N workers takes 1/N of it,
    # so N workers take the same optimiser steps per epoch, and warm-up iterations mean the same.
    train = prepare(train_loader(dataset("train", True), batch_size=per_worker_batch(protocol.batch_size, world),
                                 seed=spec.seed, rank=rank, world_size=world), add_dist_sampler=False)
    val = prepare(eval_loader(dataset("val", False), batch_size=protocol.eval_batch_size, rank=rank,
                              world_size=world), add_dist_sampler=False)
    test = prepare(eval_loader(dataset("test", False), batch_size=protocol.eval_batch_size, rank=rank,
                               world_size=world), add_dist_sampler=False)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = _load_state(directory)

    tracker = (MlflowTracker(tracking_uri=spec.tracking_uri, run_id=spec.mlflow_run_id,
                             system_metrics=spec.system_metrics) if rank == 0 else NullTracker())
    hooks: list[loop.EpochHook] = [_Tracking(tracker), _Checkpointing(rank)]
    if spec.kill_at_epoch is not None:
        hooks.append(_FaultInjection(spec, rank))
    try:
        session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol,
                           num_classes=len(spec.classes), seed=spec.seed, device=device, hooks=hooks,
                           resume=resume, gather=_gather, rank=rank, autocast=autocast,
                           channels_last=channels_last)
        _finish(spec, session, model, val=val, test=test, device=device, rank=rank, tracker=tracker,
                autocast=autocast, channels_last=channels_last, nodes=nodes)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def _finish(spec: WorkerSpec, session: loop.FitSession, model: torch.nn.Module, *, val: Any, test: Any,
            device: torch.device, rank: int, tracker: Any, autocast: torch.dtype | None,
            channels_last: bool, nodes: list[str]) -> None:
    """Best weights -> val/test metrics, figures, predictions and the model, logged by rank 0."""
    import ray.train

    state = session.state
    best = session.best_model_state
    if best is None:  # the best epoch predates a resume: its checkpoint is kept (best by val loss)
        best = _load_state(Path(spec.run_dir) / checkpoint_name(state.best_epoch))["model"]
    classifier = loop.unwrap(model)
    classifier.load_state_dict(best)
    n = len(spec.classes)
    outputs = {}
    for split, loader in (("val", val), ("test", test)):
        logits, labels, loss = loop.predict(model, loader, device=device, gather=_gather, autocast=autocast,
                                            channels_last=channels_last)
        outputs[split] = (logits, labels, classification_metrics(logits, labels, num_classes=n))
    final: dict[str, Any] = {
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "best_val_loss": state.best_val_loss,
        "stop_reason": state.stop_reason, "resumed_at_epochs": list(state.resumed_at_epochs),
        "history": state.history, "world_size": len(nodes), "worker_nodes": nodes,
        "report_interval_s": float(os.environ.get(REPORT_INTERVAL_ENV, "nan")),
        "worker_env": start_environment(WORKER_ENV),
    }
    for split, (_, _, values) in outputs.items():
        final.update({f"{split}_{k}": v for k, v in values.items()})
    if rank == 0:
        _log_outcome(spec, final, outputs, classifier, tracker)
        tmp = Path(spec.run_dir) / f"{FINAL_FILE}.tmp"
        tmp.write_text(json.dumps(final, indent=2))
        os.replace(tmp, Path(spec.run_dir) / FINAL_FILE)
    ray.train.report({"best_val_loss": state.best_val_loss, "val_loss": state.best_val_loss,
                      "done": 1.0}, checkpoint=None)


def _log_outcome(spec: WorkerSpec, final: dict[str, Any], outputs: dict[str, Any], classifier: torch.nn.Module,
                 tracker: Any) -> None:
    tracker.log_metrics({k: v for k, v in final.items()
                         if k.startswith(("val_", "test_")) and isinstance(v, float)})
    tracker.log_metrics({"best_epoch": final["best_epoch"], "epochs_run": final["epochs_run"]})
    tracker.set_tags({"transferbench.stop_reason": final["stop_reason"],
                      "transferbench.resumed_at_epochs": ",".join(map(str, final["resumed_at_epochs"])) or "-",
                      "transferbench.world_size": final["world_size"],
                      "transferbench.ray_nodes": len(set(final["worker_nodes"]))})
    title = (f"{spec.task} / {spec.backbone_name} ({spec.backbone.family}, weights: {spec.backbone.weights}"
             f"{', RANDOM INIT' if spec.backbone.weights == 'none' else ''}) seed {spec.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        test_logits, test_labels, _ = outputs["test"]
        tracker.log_artifact(confusion_matrix_figure(test_logits, test_labels, spec.classes,
                                                     Path(tmp) / "confusion_matrix_test.png", title=title), "plots")
        tracker.log_artifact(learning_curve_figure(final["history"], Path(tmp) / "learning_curve.png",
                                                   title=title), "plots")
        predictions = Path(tmp) / "test_predictions.csv"
        lines = ["filename,label,prediction"] + [
            f"{f},{spec.classes[y]},{spec.classes[p]}"
            for f, y, p in zip(spec.filenames["test"], test_labels, test_logits.argmax(1), strict=True)]
        predictions.write_text("\n".join(lines) + "\n")
        tracker.log_artifact(predictions, "predictions")
    if spec.log_model:
        cpu_model = classifier.to("cpu").eval()
        cached = CachedImages(spec.cache_files["val"], img_size=spec.img_size, mean=spec.mean, std=spec.std,
                              train=False)
        example = torch.stack([cached[i][0] for i in range(min(2, len(cached)))]).numpy().astype(np.float32)
        with torch.no_grad():
            output = cpu_model(torch.from_numpy(example)).numpy()
        tracker.log_model(cpu_model, input_example=example, output_example=output)


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
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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
