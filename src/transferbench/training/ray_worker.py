"""What each Ray Train worker runs: model, loaders, ``loop.fit`` with per-epoch reports and
checkpoints, then the best weights' val/test metrics, figures and model (rank 0 logs them).

Started by ``ray_trainer.train_worker``, which imports this module inside the worker: it pulls
in torch, torchvision, scikit-learn and matplotlib, and Ray Train's controller, which only
unpickles ``train_worker``, need not import them (~2.4 s of every run's start-up on 2 cores).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
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

logger = logging.getLogger(__name__)


def _gather(obj: Any) -> list[Any]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class _Tracking:
    """Per-epoch metrics to the tracker (rank 0), after the epoch's checkpoint is written.

    A resumed run logs each epoch once, with no gap: epochs the tracker already has (a run
    killed after logging them) are not logged again, and epochs the resumed checkpoint holds
    but the tracker lacks (killed between the checkpoint and the log) are logged on resume.
    """

    def __init__(self, tracker: Any, resumed_history: list[dict[str, float]] | None = None) -> None:
        self.tracker = tracker
        self.logged_through = tracker.last_logged_step("val_loss")  # 0 for a new run
        for record in resumed_history or ():
            self._log(record)

    def _log(self, record: dict[str, float]) -> None:
        epoch = int(record["epoch"])
        if epoch > self.logged_through:
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            self.logged_through = epoch

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        self._log(record)
        return False


class _Checkpointing:
    """Every epoch, the session's state as a Ray Train checkpoint, reported by every rank (written by rank 0).

    The state is written straight into the run's directory on the (local or shared, mounted)
    storage, where Ray Train keeps its checkpoints, as ``state.pt.tmp`` renamed to ``state.pt``
    once complete, and reported without an upload (``CheckpointUploadMode.NO_UPLOAD``).
    ``ray.storage_path`` is never a URI (``RaySettings`` rejects them), so the run directory is
    the storage. In local mode Ray Train keeps no checkpoints: this hook prunes them as
    ``CheckpointConfig`` would (the best ``checkpoints_to_keep`` by val loss, plus the latest).
    """

    def __init__(self, spec: WorkerSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        import ray.train
        from ray.train import CheckpointUploadMode

        name = checkpoint_name(int(record["epoch"]))
        if self.rank != 0:
            ray.train.report(dict(record), checkpoint=None, checkpoint_dir_name=name)
            return False
        directory = Path(self.spec.run_dir) / name
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"{STATE_FILE}.tmp"  # a resumed epoch may find a killed attempt's file
        torch.save(session.state_dict(), tmp)
        os.replace(tmp, directory / STATE_FILE)
        ray.train.report(dict(record), checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        if self.spec.local_mode:
            prune_checkpoints(self.spec.run_dir, session.state.history, keep=self.spec.checkpoints_to_keep)
        return False


def _epoch_of(directory: Path) -> int | None:
    prefix = checkpoint_name(0)[:-4]
    digits = directory.name[len(prefix):]
    return int(digits) if directory.name.startswith(prefix) and digits.isdigit() else None


def latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest complete checkpoint's state in ``run_dir`` (local mode's resume), or None.

    Only ``state.pt`` counts: a checkpoint being written when the process died is still
    ``state.pt.tmp``. A ``state.pt`` that does not load (truncated by a full disk or a crash of
    the machine) is skipped with a warning naming it, and the one before it is used.
    """
    epochs = sorted(((e, d) for d in Path(run_dir).glob(checkpoint_name(0)[:-4] + "*")
                     if (e := _epoch_of(d)) is not None), reverse=True)
    for _, directory in epochs:
        path = directory / STATE_FILE
        if not path.is_file():
            continue
        try:
            return _load_state(directory)
        except Exception as exc:  # noqa: BLE001 -- any unreadable file: fall back to the previous checkpoint
            logger.warning("skipping unreadable checkpoint %s (%s: %s); resuming from the one before it",
                           path, type(exc).__name__, exc)
    return None


def prune_checkpoints(run_dir: str | Path, history: list[dict[str, float]], *, keep: int) -> list[int]:
    """Delete the checkpoints of ``history``'s epochs but the ``keep`` best by val loss and the latest; returns the kept."""
    val_loss = {int(r["epoch"]): r["val_loss"] for r in history}
    present = {e: d for d in Path(run_dir).iterdir() if (e := _epoch_of(d)) is not None and e in val_loss}
    if not present:
        return []
    kept = set(sorted(present, key=lambda e: (val_loss[e], e))[:keep]) | {max(present)}
    for epoch, directory in present.items():
        if epoch not in kept:
            shutil.rmtree(directory, ignore_errors=True)
    return sorted(kept)


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
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


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
    if spec.local_mode:  # no worker_runtime_env in local mode; cuBLAS reads this when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", WORKER_ENV["CUBLAS_WORKSPACE_CONFIG"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Local mode's get_device() is CUDA whenever CUDA exists: ray.use_gpu decides here.
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
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
    # In local mode there is no Ray node: the host stands for it.
    node = f"local:{socket.gethostname()}" if spec.local_mode else ray.get_runtime_context().get_node_id()
    nodes = [str(n) for n in _gather(node)]

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
    if spec.local_mode:  # local mode keeps no checkpoint state across processes: the run directory does
        resume = latest_checkpoint(spec.run_dir)
    elif (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as directory:
            resume = _load_state(directory)

    tracker = (MlflowTracker(tracking_uri=spec.tracking_uri, run_id=spec.mlflow_run_id,
                             system_metrics=spec.system_metrics) if rank == 0 else NullTracker())
    tracking = _Tracking(tracker, resume["loop"]["history"] if resume else None)
    hooks: list[loop.EpochHook] = [_Checkpointing(spec, rank), tracking]
    if spec.kill_at_epoch is not None:
        hooks.append(_FaultInjection(spec, rank))
    try:
        session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol,
                           num_classes=len(spec.classes), seed=spec.seed, device=device, hooks=hooks,
                           resume=resume, gather=_gather, rank=rank, autocast=autocast,
                           channels_last=channels_last)
        _finish(spec, session, model, val=val, test=test, device=device, rank=rank, tracker=tracker,
                autocast=autocast, channels_last=channels_last, nodes=nodes)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this): a rerun resumes the run
        tracker.close("KILLED")
        raise
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
