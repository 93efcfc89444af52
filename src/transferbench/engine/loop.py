"""The fine-tuning loop of PROTOCOL.md, for any task kind, with no Ray and no MLflow in it.

Protocol (every number from ``FinetuneSettings``; the loss, metrics, optimiser and schedule from
the task kind):
- ``full`` mode: the first ``warmup_iters`` iterations train only the head (backbone frozen,
  in eval mode) at ``warmup_lr``; then the whole network trains at ``lr``.
- ``linear_probe`` mode: the backbone stays frozen throughout and the head trains at ``lr``
  (no warm-up: it exists to protect the backbone from an untrained head).
- The learning rate is set at the two phase changes only: warm-up's end, and the plateau
  schedule's halving (the kind's ``scheduler``, stepped with the val selection metric after
  warm-up). Early stop after ``early_stop_patience`` epochs without improvement of the kind's
  selection metric, or at ``max_epochs``.
- ``schedule: poly`` (the dense protocol) counts iterations instead: an "epoch" is a round of
  ``eval_every`` iterations (the train loader's ``RoundSampler``), the scheduler (linear warm-up
  of the whole network, then poly decay) steps after every iteration, and training stops after
  ``max_iters`` iterations with no early stop; the best round by the selection metric is kept.

Outputs and targets are tensors or dicts of tensors (multi-task kinds), batch first.

Distribution is injected, not imported: ``gather`` collects one object from every rank
(``torch.distributed.all_gather_object`` under DDP, ``[obj]`` alone), so val metrics are
exact and identical on every rank. Reporting, checkpointing and pruning are ``EpochHook``
callables: ``hook(record, session) -> bool`` (True stops training).

Determinism: every epoch reseeds torch from (seed, epoch, rank) and the sampler from
(seed, epoch), so a run resumed from epoch k's checkpoint replays epoch k+1 exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from transferbench.config import FinetuneSettings
from transferbench.engine.augment import BatchAugment
from transferbench.engine.tasks import TaskKind
from transferbench.progress import progress

Gather = Callable[[Any], list[Any]]


def gather_single(obj: Any) -> list[Any]:
    return [obj]


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s and DistributedDataParallel's wrappers (or the model itself), whose
    state dict has the task model's keys (a compiled module's carry an ``_orig_mod.`` prefix)."""
    # by the wrapped module's name, not by isinstance: OptimizedModule's would import torch._dynamo everywhere
    while (inner := model._modules.get("_orig_mod", model._modules.get("module"))) is not None:
        model = inner
    return model


@dataclass
class LoopState:
    """Everything the loop needs to resume; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    best_score: float | None = None  # the kind's val selection metric at the best epoch (None: no epoch yet)
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_at_epochs: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoopState:
        return cls(**raw)


@dataclass
class FitSession:
    """The live objects of one fit; hooks read it and checkpoint from ``state_dict()``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    state: LoopState
    best_model_state: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "loop": asdict(self.state)}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.state = LoopState.from_dict(blob["loop"])


class EpochHook(Protocol):
    def __call__(self, record: dict[str, float], session: FitSession) -> bool | None:
        """Called on every rank after each epoch; return True to stop training."""


def epoch_seed(seed: int, *, epoch: int = 0, rank: int = 0) -> int:
    """One rank's seed for one epoch, below 2**31."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)


def seed_everything(seed: int, *, epoch: int = 0, rank: int = 0) -> None:
    value = epoch_seed(seed, epoch=epoch, rank=rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def in_warmup(protocol: FinetuneSettings, step: int) -> bool:
    """In the classification protocol's head-only warm-up (the poly schedule warms up the lr instead)."""
    return protocol.mode == "full" and protocol.schedule == "plateau" and step < protocol.warmup_iters


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on a tensor, or on each value of a dict of them (outputs and targets of multi-task kinds)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _concat(parts: Sequence[Any]) -> Any:
    """Concatenate per-batch (or per-rank) numpy trees along the batch."""
    if isinstance(parts[0], dict):
        return {k: _concat([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def _select(tree: Any, order: np.ndarray) -> Any:
    return tree_map(lambda a: a[order], tree)


def _length(loader: Iterable) -> int | None:
    """The number of batches of ``loader``, if it knows it."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _to_device(tree: Any, device: torch.device) -> Any:
    return tree_map(lambda t: t.to(device, non_blocking=True), tree)


def _float(tree: Any) -> Any:
    return tree_map(lambda t: t.float(), tree)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, device: torch.device, gather: Gather = gather_single,
            autocast: torch.dtype | None = None, channels_last: bool = False, loss_fn: nn.Module | None = None,
            reduce: Callable[[Any], Any] | None = None) -> tuple[Any, Any, float]:
    """Outputs and targets of every sample (all ranks' shards, in dataset order), and the mean loss.

    ``reduce`` (the kind's ``reduce``) shrinks each batch's outputs on the device, after the loss is taken
    from the full outputs (a dense kind keeps its arg-max mask, not its per-class logits)."""
    was_training = model.training
    model.eval()
    indices, outputs, targets = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device, read once (see fit)
    for images, target, idx in loader:
        images, target = images.to(device, non_blocking=True), _to_device(target, device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, autocast):
            out = model(images)
        out = _float(out)
        if loss_fn is not None:
            loss_sum += loss_fn(out, target).double() * len(images)
        if reduce is not None:
            out = reduce(out)
        indices.append(idx), outputs.append(tree_map(lambda t: t.cpu().numpy(), out))
        targets.append(tree_map(lambda t: t.cpu().numpy(), target))
    model.train(was_training)
    # this rank's share, one array (tree) per field; a rank with no samples sends None
    mine = ((torch.cat(indices).numpy(), _concat(outputs), _concat(targets)) if indices else None, float(loss_sum))
    parts = gather(mine)
    shards = [p[0] for p in parts if p[0] is not None]
    if not shards:
        raise ValueError("predict: the loader yielded no samples")
    order = np.concatenate([s[0] for s in shards]).argsort(kind="stable")
    all_outputs = _select(_concat([s[1] for s in shards]), order)
    all_targets = _select(_concat([s[2] for s in shards]), order)
    mean_loss = sum(p[1] for p in parts) / max(len(order), 1)
    return all_outputs, all_targets, mean_loss


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fit(model: nn.Module, *, kind: TaskKind, train_loader: Iterable, val_loader: Iterable,
        protocol: FinetuneSettings, seed: int, device: torch.device | str = "cpu", hooks: Sequence[EpochHook] = (),
        resume: dict[str, Any] | None = None, gather: Gather = gather_single, rank: int = 0,
        autocast: torch.dtype | None = None, channels_last: bool = False,
        augment: BatchAugment | None = None) -> FitSession:
    """Fine-tune ``model`` (a ``TaskModel``, possibly DDP-wrapped) until early stop or max_epochs.

    ``augment``: the training batches arrive uncropped (uint8, ``CachedImages(device_augment=True)``) and
    are augmented on ``device`` after the transfer, from a generator seeded by (seed, epoch, rank).

    ``resume`` is a ``FitSession.state_dict()`` from a checkpoint. Returns the session; its
    ``best_model_state`` holds the best weights seen by THIS call (None if the best epoch
    predates a resume: the caller then loads them from that epoch's checkpoint).
    """
    device = torch.device(device)
    task_model = unwrap(model)
    if protocol.mode == "linear_probe":
        for p in task_model.backbone.parameters():
            p.requires_grad_(False)
    optimizer = kind.optimizer([p for p in model.parameters() if p.requires_grad], protocol)
    scheduler = kind.scheduler(optimizer, protocol)
    session = FitSession(model, optimizer, scheduler, LoopState())
    if resume is not None:
        session.load_state_dict(resume)
        if not session.state.finished:
            session.state.resumed_at_epochs.append(session.state.epoch)
    state = session.state
    selection = kind.selection
    # The phase the run is in: warm-up (backbone frozen, warmup_lr) until warmup_iters steps, then
    # the whole network from lr; linear probing keeps the backbone frozen at lr. The optimiser's lr
    # is set here and at warm-up's end only; after that the plateau schedule owns it.
    task_model.freeze_backbone(in_warmup(protocol, state.step) or protocol.mode == "linear_probe")
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if state.step == 0 and plateau:  # the poly schedule sets the lr of every step itself
        _set_lr(optimizer, protocol.warmup_lr if in_warmup(protocol, 0) else protocol.lr)
    loss_fn = kind.loss(protocol)
    # bars in a terminal only (progress.enabled), and on rank 0 only: one bar per run, not one per rank
    epochs = progress(desc="epochs", total=protocol.epochs, initial=state.epoch, unit="epoch", disable=rank != 0)

    while not state.finished:
        epoch = state.epoch + 1
        seed_everything(seed, epoch=epoch, rank=rank)
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        # + 2**31: a stream of its own, never the one torch's global generator was just seeded with
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch=epoch, rank=rank) + 2**31)
        model.train()
        started = time.perf_counter()
        warm_start = in_warmup(protocol, state.step)
        # summed on the device and read once per epoch: a read per step would make the host wait for
        # the GPU at every step (float64, as the host summed each step's float32 loss before)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        statistic = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        steps = progress(train_loader, desc=f"epoch {epoch}", total=_length(train_loader), unit="step",
                         disable=rank != 0)
        for images, targets, _ in steps:
            if plateau and protocol.mode == "full" and state.step == protocol.warmup_iters and protocol.warmup_iters:
                task_model.freeze_backbone(False)  # warm-up is over: the whole network, from lr
                _set_lr(optimizer, protocol.lr)
            images, targets = images.to(device, non_blocking=True), _to_device(targets, device)
            if augment is not None:
                images, targets = augment(images, targets, generator)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast):
                outputs = model(images)
            outputs = _float(outputs)
            loss = loss_fn(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not plateau:
                scheduler.step()
            state.step += 1
            loss_sum += loss.detach().double() * len(images)
            statistic += kind.statistic(outputs, targets).double()
            seen += len(images)
        totals = np.sum(np.array(gather((float(loss_sum), float(statistic), seen)), dtype=np.float64), axis=0)
        val_outputs, val_targets, val_loss = predict(model, val_loader, device=device, gather=gather,
                                                     autocast=autocast, channels_last=channels_last, loss_fn=loss_fn,
                                                     reduce=kind.reduce)
        val = {"loss": val_loss, **kind.evaluate(val_outputs, val_targets)}
        score = val[selection.name]
        if score is None:  # e.g. no valid depth pixel in val: nothing to select on
            raise ValueError(f"val_{selection.name} is undefined on the validation split (empty or no valid target)")
        if plateau and not in_warmup(protocol, state.step):
            scheduler.step(score)
        # the first epoch improves on nothing unless its score is a number (a NaN loss never improves)
        worst = -math.inf if selection.higher_is_better else math.inf
        improved = selection.better(score, worst if state.best_score is None else state.best_score)
        if improved:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
            session.best_model_state = {k: v.detach().cpu().clone() for k, v in task_model.state_dict().items()}
        else:
            state.bad_epochs += 1
        record: dict[str, Any] = {
            "epoch": epoch, "step": state.step, "train_loss": totals[0] / max(totals[2], 1),
            f"train_{kind.train_statistic}": totals[1] / max(totals[2], 1),
            **{f"val_{k}": v for k, v in val.items() if v is not None},
            "lr": optimizer.param_groups[0]["lr"], "warmup": float(warm_start), "improved": float(improved),
            "epoch_seconds": time.perf_counter() - started,
        }
        # plain Python numbers (no numpy scalars): checkpoints then load with torch.load(weights_only=True)
        record = {k: v.item() if isinstance(v, np.generic) else v for k, v in record.items()}
        state.history.append(record)
        state.epoch = epoch
        epochs.set_postfix_str(f"val_{selection.name} {score:.4g}", refresh=False)
        epochs.update(1)
        if plateau and state.bad_epochs >= protocol.early_stop_patience:
            state.finished, state.stop_reason = True, "early_stop"
        elif epoch >= protocol.epochs:
            state.finished, state.stop_reason = True, "max_epochs" if plateau else "max_iters"
        stop = False
        for hook in hooks:
            stop = bool(hook(record, session)) or stop
        if stop and not state.finished:
            state.finished, state.stop_reason = True, "hook"
    epochs.close()
    return session


def best_record(history: Sequence[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """The history's record of ``best_epoch``."""
    return next(r for r in history if int(r["epoch"]) == best_epoch)
