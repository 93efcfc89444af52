"""What each Ray Train worker runs: model, loaders, ``loop.fit`` with per-epoch reports and
checkpoints, then the best weights' val/test metrics, figures and model (rank 0 logs them).

Started by ``ray_trainer.train_worker``, which imports this module inside the worker: it pulls
in torch, torchvision, scikit-learn and matplotlib, and Ray Train's controller, which only
unpickles ``train_worker``, need not import them (~2.4 s of every run's start-up on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferbench.errors import TransferbenchError
from transferbench.training import loop
from transferbench.training.data import CachedImages, eval_loader, train_loader
from transferbench.training.metrics import (
    classification_metrics,
    confusion_matrix_figure,
    learning_curve_figure,
)
from transferbench.training.ray_trainer import (
    FINAL_FILE,
    KILL_MARKER,
    REPORT_INTERVAL_ENV,
    STATE_FILE,
    WORKER_ENV,
    WorkerSpec,
    checkpoint_name,
    per_worker_batch,
    start_environment,
)


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
    """Every epoch, the session's state as a Ray Train checkpoint, reported by rank 0.

    The state is written straight into the run's directory on the (local or shared, mounted)
    storage, where Ray Train keeps its checkpoints, and reported without an upload
    (``CheckpointUploadMode.NO_UPLOAD``): written once, not written to a temporary directory
    and then copied (resnet18 on the 2-core CPU: 0.74 s between epochs with the copy).
    ``ray.storage_path`` is never a URI (``RaySettings`` rejects them), so the storage is local.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        import pyarrow.fs
        import ray.train
        from ray.train import CheckpointUploadMode

        name = checkpoint_name(int(record["epoch"]))
        if self.rank != 0:
            ray.train.report(dict(record), checkpoint=None, checkpoint_dir_name=name)
            return False
        storage = ray.train.get_context().get_storage()
        if not isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem):
            raise TransferbenchError(f"Ray Train storage {storage.storage_fs_path!r} is on "
                                     f"{storage.storage_filesystem.type_name!r}; checkpoints need a mounted path")
        directory = Path(storage.experiment_fs_path) / name
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{STATE_FILE}.tmp"  # a resumed epoch may find a killed attempt's file
        torch.save(session.state_dict(), tmp)
        os.replace(tmp, directory / STATE_FILE)
        ray.train.report(dict(record), checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
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


def hardware(device: torch.device, autocast: torch.dtype | None, channels_last: bool) -> dict[str, Any]:
    """What rank 0 trained on, as it ran (not as configured): ``device`` (``cpu`` or the GPU's name),
    ``precision`` (``bf16-autocast`` or ``fp32``) and ``channels_last``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "precision": "bf16-autocast" if autocast == torch.bfloat16 else "fp32",
            "channels_last": channels_last}


def run(config: dict[str, Any]) -> None:
    """The body of ``ray_trainer.train_worker``: one rank's whole fine-tune."""
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
    processes = {"workers": spec.loader_workers, "pin_memory": on_gpu}  # ray.loader_workers
    train = prepare(train_loader(dataset("train", True), batch_size=per_worker_batch(protocol.batch_size, world),
                                 seed=spec.seed, rank=rank, world_size=world, **processes), add_dist_sampler=False)
    val = prepare(eval_loader(dataset("val", False), batch_size=protocol.eval_batch_size, rank=rank,
                              world_size=world, **processes), add_dist_sampler=False)
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
        logits, labels, _ = loop.predict(model, loader, device=device, gather=_gather, autocast=autocast,
                                            channels_last=channels_last)
        outputs[split] = (logits, labels, classification_metrics(logits, labels, num_classes=n))
    final: dict[str, Any] = {
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "best_val_loss": state.best_val_loss,
        "stop_reason": state.stop_reason, "resumed_at_epochs": list(state.resumed_at_epochs),
        "history": state.history, "world_size": len(nodes), "worker_nodes": nodes,
        **hardware(device, autocast, channels_last),
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
                      "transferbench.device": final["device"], "transferbench.precision": final["precision"],
                      "transferbench.channels_last": str(final["channels_last"]).lower(),
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
