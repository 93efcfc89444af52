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
from transferbench.engine.tasks import TaskKind

Gather = Callable[[Any], list[Any]]


def gather_single(obj: Any) -> list[Any]:
    return [obj]


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


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
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
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


def seed_everything(seed: int, *, epoch: int = 0, rank: int = 0) -> None:
    value = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def in_warmup(protocol: FinetuneSettings, step: int) -> bool:
    return protocol.mode == "full" and step < protocol.warmup_iters


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, device: torch.device, gather: Gather = gather_single,
            autocast: torch.dtype | None = None, channels_last: bool = False,
            loss_fn: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Outputs and targets of every sample (all ranks' shards, in dataset order), and the mean loss."""
    was_training = model.training
    model.eval()
    indices, outputs, targets = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device, read once (see fit)
    for images, target, idx in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, autocast):
            out = model(images)
        out = out.float()
        if loss_fn is not None:
            loss_sum += loss_fn(out, target).double() * len(target)
        indices.append(idx), outputs.append(out), targets.append(target)
    model.train(was_training)
    cat = (lambda xs, shape: torch.cat(xs).cpu().numpy() if xs else np.empty(shape))  # one copy to the host
    mine = (cat(indices, (0,)), cat(outputs, (0, 0)), cat(targets, (0,)), float(loss_sum))
    parts = gather(mine)
    order = np.concatenate([p[0] for p in parts]).argsort(kind="stable")
    all_outputs = np.concatenate([p[1] for p in parts if len(p[1])])[order]
    all_targets = np.concatenate([p[2] for p in parts])[order]
    mean_loss = sum(p[3] for p in parts) / max(len(all_targets), 1)
    return all_outputs, all_targets, mean_loss


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fit(model: nn.Module, *, kind: TaskKind, train_loader: Iterable, val_loader: Iterable,
        protocol: FinetuneSettings, seed: int, device: torch.device | str = "cpu", hooks: Sequence[EpochHook] = (),
        resume: dict[str, Any] | None = None, gather: Gather = gather_single, rank: int = 0,
        autocast: torch.dtype | None = None, channels_last: bool = False) -> FitSession:
    """Fine-tune ``model`` (a ``TaskModel``, possibly DDP-wrapped) until early stop or max_epochs.

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
    if state.step == 0:
        _set_lr(optimizer, protocol.warmup_lr if in_warmup(protocol, 0) else protocol.lr)
    loss_fn = kind.loss(protocol)

    while not state.finished:
        epoch = state.epoch + 1
        seed_everything(seed, epoch=epoch, rank=rank)
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        warm_start = in_warmup(protocol, state.step)
        # summed on the device and read once per epoch: a read per step would make the host wait for
        # the GPU at every step (float64, as the host summed each step's float32 loss before)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        statistic = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for images, targets, _ in train_loader:
            if protocol.mode == "full" and state.step == protocol.warmup_iters and protocol.warmup_iters:
                task_model.freeze_backbone(False)  # warm-up is over: the whole network, from lr
                _set_lr(optimizer, protocol.lr)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast):
                outputs = model(images)
            loss = loss_fn(outputs.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            loss_sum += loss.detach().double() * len(targets)
            statistic += kind.statistic(outputs, targets).double()
            seen += len(targets)
        totals = np.sum(np.array(gather((float(loss_sum), float(statistic), seen)), dtype=np.float64), axis=0)
        val_outputs, val_targets, val_loss = predict(model, val_loader, device=device, gather=gather,
                                                     autocast=autocast, channels_last=channels_last, loss_fn=loss_fn)
        val = {"loss": val_loss, **kind.evaluate(val_outputs, val_targets)}
        score = val[selection.name]
        if not in_warmup(protocol, state.step):
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
        if state.bad_epochs >= protocol.early_stop_patience:
            state.finished, state.stop_reason = True, "early_stop"
        elif epoch >= protocol.max_epochs:
            state.finished, state.stop_reason = True, "max_epochs"
        stop = False
        for hook in hooks:
            stop = bool(hook(record, session)) or stop
        if stop and not state.finished:
            state.finished, state.stop_reason = True, "hook"
    return session


def best_record(history: Sequence[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """The history's record of ``best_epoch``."""
    return next(r for r in history if int(r["epoch"]) == best_epoch)
