"""What each training process runs: model, loaders, ``loop.fit`` with per-epoch checkpoints and
metrics, then the best weights' val/test metrics, figures and model (rank 0 logs them).

Started by ``ray_driver.train_worker`` in a Ray Train worker actor, or in the calling process in
local mode (``ray.num_workers: 0``); the same code either way, with a local equivalent of what
local mode does not provide: the device from ``ray.use_gpu``, the host as the node, the run
directory as the checkpoint state, and pruning. Every task-specific step goes through the task
kind (``spec.kind``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from transferbench.atomic import write_text
from transferbench.engine import loop
from transferbench.engine.augment import batch_augment
from transferbench.engine.checkpoints import (CheckpointWriteError, StateWriter, epoch_of, latest_checkpoint,
                                              load_state, prune_checkpoints, snapshot)
from transferbench.engine.curves import learning_curve_figure
from transferbench.engine.data import CachedImages, eval_loader, train_loader
from transferbench.engine.spec import FINAL_FILE, WORKER_ENV, WorkerSpec, checkpoint_name, per_worker_batch
from transferbench.engine.tracking import MlflowTracker, NullTracker, Tracker
from transferbench.models import build_model

logger = logging.getLogger(__name__)

def _gather(obj: Any) -> list[Any]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class _Tracking:
    """Per-epoch metrics to the tracker (rank 0), once the epoch's checkpoint is being written.

    A resumed run logs each epoch once, with no gap: epochs the tracker already has (a run
    killed after logging them, its checkpoint perhaps unfinished) are not logged again (the
    replayed epoch's metrics are the same), and epochs the resumed checkpoint holds but the
    tracker lacks (killed between the checkpoint and the log) are logged on resume.
    The MLflow step is the epoch, or with the iteration-based protocol (``by_iteration``) the
    iteration count at the end of the round, so curves are drawn per iteration.
    """

    def __init__(self, tracker: Tracker, resumed_history: list[dict[str, float]] | None = None, *,
                 by_iteration: bool = False) -> None:
        self.tracker, self.x = tracker, "step" if by_iteration else "epoch"
        self.logged_through = tracker.last_logged_step("val_loss")  # 0 for a new run
        for record in resumed_history or ():
            self._log(record)

    def _log(self, record: dict[str, float]) -> None:
        step = int(record[self.x])
        if step > self.logged_through:
            self.tracker.log_metrics({k: v for k, v in record.items() if k != self.x}, step=step)
            self.logged_through = step

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        self._log(record)
        return False


class _Checkpointing:
    """Every epoch, the session's state as a Ray Train checkpoint, reported by every rank (written by rank 0).

    The state is written straight into the run's directory on the (local or shared, mounted)
    storage, where Ray Train keeps its checkpoints, as ``state.pt.tmp`` renamed to ``state.pt``
    once complete. ``ray.storage_path`` is never a URI (``RaySettings`` rejects them), so the run
    directory is the storage and nothing is uploaded. In local mode Ray Train keeps no
    checkpoints: this hook prunes them as ``CheckpointConfig`` would.

    The write is off the critical path (issue #25): the hook snapshots the state to CPU (the only
    part the next epoch waits for) and a ``StateWriter`` thread writes it during the next epoch.
    Rank 0 reports with ``CheckpointUploadMode.ASYNC``, whose upload function is "wait for this
    write": Ray Train queues the report only once the file is complete, so it never registers a
    checkpoint that a restore could find half-written; the other ranks' reports of the same epoch
    wait in the controller for rank 0's. ``flush`` must run before anything reads the checkpoints.
    """

    def __init__(self, spec: WorkerSpec, rank: int) -> None:
        self.spec, self.rank = spec, rank
        self.writer = StateWriter()

    def __call__(self, record: dict[str, float], session: loop.FitSession) -> bool:
        import ray.train
        from ray.train import CheckpointUploadMode

        name = checkpoint_name(int(record["epoch"]))
        if self.rank != 0:
            ray.train.report(dict(record), checkpoint=None, checkpoint_dir_name=name)
            return False
        self.writer.wait()  # the previous epoch's: one write in flight, and its error raised here
        self._prune(session)
        directory = Path(self.spec.run_dir) / name
        write = self.writer.start(directory, snapshot(session.state_dict()))

        def written(checkpoint: ray.train.Checkpoint, _: str) -> ray.train.Checkpoint:
            write.result()  # in Ray Train's upload thread (actors only; local mode calls no upload)
            return checkpoint

        ray.train.report(dict(record), checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=written, delete_local_checkpoint_after_upload=False)
        return False

    def flush(self, session: loop.FitSession) -> None:
        """Every checkpoint on disk (and pruned); raises a failed write's error."""
        self.writer.wait()
        self._prune(session)

    def settle(self) -> None:
        """On the way out of a failed or interrupted run: let the write in flight finish, so a rerun resumes
        from it, and log (not raise) its error, which must not hide the one that ended the run."""
        try:
            self.writer.wait()
        except CheckpointWriteError as exc:
            logger.error("%s", exc)

    def _prune(self, session: loop.FitSession) -> None:
        if self.spec.ray.local_mode:  # between writes, so the one in flight is never a candidate
            selection = self.spec.kind.selection
            prune_checkpoints(self.spec.run_dir, session.state.history, keep=self.spec.ray.checkpoints_to_keep,
                              selection=selection.name, higher_is_better=selection.higher_is_better)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic algorithms (warn-only) and no cuDNN autotuning for the run, so that a rerun gives the same
    metrics (the drift gate relies on it); the process's previous switches afterwards (local mode trains in the
    caller's process). Not ``ray.train.torch.enable_reproducibility``: it reseeds differently and turns
    deterministic algorithms on without ``warn_only``, which fails on ops that have no deterministic kernel."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def hardware(device: torch.device, autocast: torch.dtype | None, channels_last: bool) -> dict[str, Any]:
    """What rank 0 trained on, as it ran (not as configured): ``device`` (``cpu`` or the GPU's name),
    ``precision`` (``bf16-autocast`` or ``fp32``), ``channels_last`` and the intra-op ``threads``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "precision": "bf16-autocast" if autocast == torch.bfloat16 else "fp32",
            "channels_last": channels_last, "threads": torch.get_num_threads()}


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """``count`` intra-op threads for the run, the caller's afterwards.

    A worker actor gets ``ray.cpus_per_worker`` threads from Ray (``OMP_NUM_THREADS``); local mode would get
    the machine's cores, or ``transferbench repro``'s cores / jobs. The thread count changes the order of
    float reductions, so a run's numbers would depend on the machine and on ``--jobs`` (the smoke study's
    multi-task depth RMSE moved by 0.055 between 2 threads and 1): local mode pins it to the param too."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(spec: WorkerSpec) -> None:
    """One rank's whole fine-tune (the body of ``ray_driver.train_worker``)."""
    threads = (_threads(max(1, int(spec.ray.cpus_per_worker))) if spec.ray.local_mode
               else contextlib.nullcontext())
    with _deterministic(), threads:
        _run(spec)


def _run(spec: WorkerSpec) -> None:
    import ray
    import ray.train
    import ray.train.torch

    settings = spec.ray
    if settings.local_mode:  # no worker_runtime_env in local mode; cuBLAS reads this when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", WORKER_ENV["CUBLAS_WORKSPACE_CONFIG"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Local mode's get_device() is CUDA whenever CUDA exists: ray.use_gpu decides here.
    device = ray.train.torch.get_device() if settings.use_gpu else torch.device("cpu")
    loop.seed_everything(spec.seed)
    on_gpu = settings.use_gpu and device.type == "cuda"
    autocast = torch.bfloat16 if on_gpu and settings.mixed_precision else None
    channels_last = on_gpu and settings.channels_last and spec.backbone.family == "convnet"

    protocol, kind = spec.protocol, spec.kind
    model = build_model(spec.backbone, img_size=spec.img_size, head=lambda n: kind.head(n, protocol),
                        features=kind.features)
    if protocol.mode == "linear_probe":  # before DDP, so DDP only syncs the head
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and kind.features == "pyramid":  # the dense protocol's batch of 8 over many GPUs: a few images
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # each, so BatchNorm syncs its statistics
    # Warm-up freezes the backbone for some iterations, and a multi-task batch may hold no image of one head's
    # dataset: DDP must tolerate unused parameters.
    head_warmup = protocol.mode == "full" and protocol.schedule == "plateau" and protocol.warmup_iters
    ddp_kwargs = {"find_unused_parameters": True} if head_warmup or kind.unused_parameters else None
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    if settings.compile:  # around DDP, so DDP's buckets split the graph; loop.unwrap sees through both
        model = torch.compile(model)
    # Which node each rank runs on (rank order), for the run's record: on a cluster the workers of
    # one run may sit on different machines, and change after a node is lost. Local mode: the host.
    node = f"local:{socket.gethostname()}" if settings.local_mode else ray.get_runtime_context().get_node_id()
    nodes = [str(n) for n in _gather(node)]

    # finetune.augment: training batches augmented on the device (uncropped uint8 from the loader), or per sample
    augment = batch_augment(protocol, kind, device=device, img_size=spec.img_size, mean=spec.input_spec.mean,
                            std=spec.input_spec.std)

    def dataset(split: str, train: bool) -> CachedImages:
        return CachedImages(spec.cache_files[split], img_size=spec.img_size, mean=spec.input_spec.mean,
                            std=spec.input_spec.std, train=train, rotation_degrees=protocol.rotation_degrees,
                            hflip=protocol.hflip, device_augment=augment is not None,
                            augment=spec.kind.train_transforms(spec.img_size, protocol) if train else None)

    prepare = ray.train.torch.prepare_data_loader
    # finetune.batch_size is the global batch (the paper's 32): each of the N workers takes 1/N of it,
    # so N workers take the same optimiser steps per epoch, and warm-up iterations mean the same.
    processes = {"workers": settings.loader_workers, "pin_memory": on_gpu}
    rounds = (protocol.eval_every, protocol.max_iters) if protocol.iteration_based else None
    train = prepare(train_loader(dataset("train", True), batch_size=per_worker_batch(protocol.batch_size, world),
                                 seed=spec.seed, rank=rank, world_size=world, rounds=rounds, **processes),
                    add_dist_sampler=False)
    val = prepare(eval_loader(dataset("val", False), batch_size=protocol.eval_batch_size, rank=rank,
                              world_size=world, **processes), add_dist_sampler=False)
    test = prepare(eval_loader(dataset("test", False), batch_size=protocol.eval_batch_size, rank=rank,
                               world_size=world), add_dist_sampler=False)

    resume = None
    if settings.local_mode:  # local mode keeps no checkpoint state across processes: the run directory does
        resume = latest_checkpoint(spec.run_dir)
    elif (checkpoint := ray.train.get_checkpoint()) is not None:  # Ray Train's, in the run directory; if torn,
        resume = latest_checkpoint(spec.run_dir, newest=epoch_of(Path(checkpoint.path)))  # the one before it

    tracker: Tracker = (MlflowTracker(tracking_uri=spec.tracking_uri, run_id=spec.mlflow_run_id,
                                      system_metrics=spec.tracking.system_metrics) if rank == 0 else NullTracker())
    checkpointing = _Checkpointing(spec, rank)
    hooks: list[loop.EpochHook] = [checkpointing,
                                   _Tracking(tracker, resume["loop"]["history"] if resume else None,
                                             by_iteration=protocol.iteration_based)]
    try:
        session = loop.fit(model, kind=kind, train_loader=train, val_loader=val, protocol=protocol, seed=spec.seed,
                           device=device, hooks=hooks, resume=resume, gather=_gather, rank=rank, autocast=autocast,
                           channels_last=channels_last, augment=augment)
        checkpointing.flush(session)  # _finish may load the best epoch's checkpoint
        _finish(spec, session, model, val=val, test=test, device=device, rank=rank, tracker=tracker,
                autocast=autocast, channels_last=channels_last, nodes=nodes)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this): a rerun resumes the run
        checkpointing.settle()
        tracker.close("KILLED")
        raise
    except BaseException:
        checkpointing.settle()
        tracker.close("FAILED")
        raise
    tracker.close("FINISHED")


def _finish(spec: WorkerSpec, session: loop.FitSession, model: torch.nn.Module, *, val: Any, test: Any,
            device: torch.device, rank: int, tracker: Tracker, autocast: torch.dtype | None,
            channels_last: bool, nodes: list[str]) -> None:
    """Best weights -> val/test metrics, figures, predictions and the model, logged by rank 0."""
    import ray.train

    state, kind = session.state, spec.kind
    best = session.best_model_state
    if best is None:  # the best epoch predates a resume: its checkpoint is kept (best by the selection metric)
        best = load_state(Path(spec.run_dir) / checkpoint_name(state.best_epoch))["model"]
    task_model = loop.unwrap(model)
    task_model.load_state_dict(best)
    outputs = {}
    loss_fn = kind.loss(spec.protocol)
    for split, loader in (("val", val), ("test", test)):
        predicted, targets, loss = loop.predict(model, loader, device=device, gather=_gather, autocast=autocast,
                                                channels_last=channels_last, loss_fn=loss_fn, reduce=kind.reduce)
        outputs[split] = (predicted, targets, {"loss": loss, **kind.evaluate(predicted, targets)})
    best_record = loop.best_record(state.history, state.best_epoch)
    final: dict[str, Any] = {
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "best_val_loss": best_record["val_loss"],
        "selection": f"val_{kind.selection.name}", "stop_reason": state.stop_reason,
        "resumed_at_epochs": list(state.resumed_at_epochs), "history": state.history, "world_size": len(nodes),
        "worker_nodes": nodes, **hardware(device, autocast, channels_last),
    }
    for split, (_, _, values) in outputs.items():
        final.update({f"{split}_{k}": v for k, v in values.items()})
    if rank == 0:
        _log_outcome(spec, final, outputs, task_model, tracker)
        write_text(Path(spec.run_dir) / FINAL_FILE, json.dumps(final, indent=2))
    selection = f"val_{kind.selection.name}"
    ray.train.report({selection: best_record[selection], "done": 1.0}, checkpoint=None)


def _log_outcome(spec: WorkerSpec, final: dict[str, Any], outputs: dict[str, Any], task_model: torch.nn.Module,
                 tracker: Tracker) -> None:
    kind = spec.kind
    # the best checkpoint's scores, as one value each (step 0); val_loss stays the per-epoch curve it already is
    tracker.log_metrics({k: v for k, v in final.items()
                         if k.startswith(("val_", "test_")) and k != "val_loss" and isinstance(v, float)})
    tracker.log_metrics({"best_epoch": final["best_epoch"], "epochs_run": final["epochs_run"]})
    tracker.set_tags({"transferbench.stop_reason": final["stop_reason"],
                      "transferbench.resumed_at_epochs": ",".join(map(str, final["resumed_at_epochs"])) or "-",
                      "transferbench.world_size": final["world_size"],
                      "transferbench.device": final["device"], "transferbench.precision": final["precision"],
                      "transferbench.channels_last": str(final["channels_last"]).lower(),
                      "transferbench.threads": final["threads"],
                      "transferbench.ray_nodes": len(set(final["worker_nodes"]))})
    title = (f"{spec.task} / {spec.backbone_name} ({spec.backbone.family}, weights: {spec.backbone.weights}"
             f"{', RANDOM INIT' if spec.backbone.weights == 'none' else ''}) seed {spec.seed}")
    with tempfile.TemporaryDirectory() as tmp:
        test_outputs, test_targets, _ = outputs["test"]
        for figure in kind.figures(test_outputs, test_targets, Path(tmp), title=title,
                                   images=_first_images(spec.cache_files["test"], spec.img_size)):
            tracker.log_artifact(figure, "plots")
        tracker.log_artifact(learning_curve_figure(final["history"], Path(tmp) / "learning_curve.png",
                                                   statistic=kind.train_statistic, title=title), "plots")
        predictions = Path(tmp) / "test_predictions.csv"
        kind.prediction_table(spec.filenames["test"], test_outputs, test_targets).to_csv(predictions, index=False)
        tracker.log_artifact(predictions, "predictions")
    if spec.tracking.log_model:
        from transferbench.engine.serving import example_png, served_spec  # MLflow's pyfunc: only where it logs

        cpu_model = task_model.to("cpu").eval()
        cached = CachedImages(spec.cache_files["val"], img_size=spec.img_size, mean=spec.input_spec.mean,
                              std=spec.input_spec.std, train=False)
        example = torch.stack([cached[i][0] for i in range(min(2, len(cached)))]).numpy()
        with torch.no_grad():
            output = loop.tree_map(lambda t: t.numpy(), cpu_model(torch.from_numpy(example)))
        tracker.log_model(cpu_model, input_example=example, output_example=output)
        first = cached.images[0].numpy()  # a real input, as the cache holds it
        served = served_spec(task=spec.task, task_settings=spec.task_settings, summary=spec.summary,
                             backbone_name=spec.backbone_name, backbone=spec.backbone, protocol=spec.protocol,
                             seed=spec.seed, img_size=spec.img_size, input_spec=spec.input_spec)
        tracker.log_serving_model(cpu_model, served, example_png(first))


def _first_images(cache_file: str, img_size: int, count: int = 4) -> Any:
    """The split's first ``count`` cached images, centre-cropped as evaluation sees them (uint8, N x 3 x H x W)."""
    from torchvision.transforms.v2 import functional as TF

    images = torch.load(cache_file, weights_only=True)["images"][:count]
    return TF.center_crop(images, [img_size, img_size]).numpy()
