"""The fine-tuning loop of PROTOCOL.md, with no Ray and no MLflow in it.

Protocol (every number from ``FinetuneSettings``):
- ``full`` mode: the first ``warmup_iters`` iterations train only the head (backbone frozen,
  in eval mode) at ``warmup_lr``; then the whole network trains at ``lr``.
- ``linear_probe`` mode: the backbone stays frozen throughout and the head trains at ``lr``
  (no warm-up: it exists to protect the backbone from an untrained head).
- Adam(betas, weight_decay); cross-entropy with label smoothing; after warm-up,
  ReduceLROnPlateau(factor, patience) on val loss; early stop after
  ``early_stop_patience`` epochs without val-loss improvement, or at ``max_epochs``.

Distribution is injected, not imported: ``gather`` collects one object from every rank
(``torch.distributed.all_gather_object`` under DDP, ``[obj]`` alone), so val metrics are
exact and identical on every rank. Reporting, checkpointing and pruning are
``EpochHook`` callables: ``hook(record, session) -> bool`` (True stops training), which is
how the Ray wrapper checkpoints, how trackers log, and how an Optuna trial is pruned.

Determinism: every epoch reseeds torch from (seed, epoch, rank) and the sampler from
(seed, epoch), so a run resumed from epoch k's checkpoint replays epoch k+1 exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from transferbench.config import FinetuneSettings
from transferbench.training.metrics import classification_metrics

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
    best_val_loss: float = math.inf
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
    val_logits: np.ndarray | None = None

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
    import random

    value = (seed * 1_000_003 + epoch * 1_009 + rank) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def make_optimizer(model: nn.Module, protocol: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=protocol.lr, betas=tuple(protocol.adam_betas),
                            weight_decay=protocol.weight_decay)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def in_warmup(protocol: FinetuneSettings, step: int) -> bool:
    return protocol.mode == "full" and step < protocol.warmup_iters


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, *, device: torch.device, gather: Gather = gather_single,
            autocast: torch.dtype | None = None, channels_last: bool = False,
            loss_fn: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits and labels of every sample (all ranks' shards, in dataset order), and the mean loss."""
    was_training = model.training
    model.eval()
    indices, logits, labels = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device, read once (see fit)
    for images, targets, idx in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, autocast):
            out = model(images)
        out = out.float()
        if loss_fn is not None:
            loss_sum += loss_fn(out, targets).double() * len(targets)
        indices.append(idx), logits.append(out), labels.append(targets)
    model.train(was_training)
    cat = (lambda xs, shape: torch.cat(xs).cpu().numpy() if xs else np.empty(shape))  # one copy to the host
    mine = (cat(indices, (0,)), cat(logits, (0, 0)), cat(labels, (0,)), float(loss_sum))
    parts = gather(mine)
    order = np.concatenate([p[0] for p in parts]).argsort(kind="stable")
    all_logits = np.concatenate([p[1] for p in parts if len(p[1])])[order]
    all_labels = np.concatenate([p[2] for p in parts])[order]
    mean_loss = sum(p[3] for p in parts) / max(len(all_labels), 1)
    return all_logits, all_labels, mean_loss


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fit(model: nn.Module, *, train_loader: Iterable, val_loader: Iterable, protocol: FinetuneSettings,
        num_classes: int, seed: int, device: torch.device | str = "cpu", hooks: Sequence[EpochHook] = (),
        resume: dict[str, Any] | None = None, gather: Gather = gather_single, rank: int = 0,
        autocast: torch.dtype | None = None, channels_last: bool = False) -> FitSession:
    """Fine-tune ``model`` (a ``Classifier``, possibly DDP-wrapped) until early stop or max_epochs.

    ``resume`` is a ``FitSession.state_dict()`` from a checkpoint. Returns the session; its
    ``best_model_state`` holds the best-val-loss weights seen by THIS call (None if the best
    epoch predates a resume: the caller then loads them from that epoch's checkpoint).
    """
    device = torch.device(device)
    classifier = unwrap(model)
    if protocol.mode == "linear_probe":
        for p in classifier.backbone.parameters():
            p.requires_grad_(False)
    optimizer = make_optimizer(model, protocol)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=protocol.plateau_factor, patience=protocol.plateau_patience)
    session = FitSession(model, optimizer, scheduler, LoopState())
    if resume is not None:
        session.load_state_dict(resume)
        if not session.state.finished:
            session.state.resumed_at_epochs.append(session.state.epoch)
    state = session.state
    loss_fn = nn.CrossEntropyLoss(label_smoothing=protocol.label_smoothing)
    eval_loss = nn.CrossEntropyLoss(label_smoothing=protocol.label_smoothing)

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
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for images, targets, _ in train_loader:
            warm = in_warmup(protocol, state.step)
            classifier.freeze_backbone(warm or protocol.mode == "linear_probe")
            _set_lr(optimizer, protocol.warmup_lr if warm else _phase_lr(optimizer, protocol, state))
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast):
                logits = model(images)
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            loss_sum += loss.detach().double() * len(targets)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(targets)
        totals = np.sum(np.array(gather((float(loss_sum), int(correct), seen)), dtype=np.float64), axis=0)
        val_logits, val_labels, val_loss = predict(model, val_loader, device=device, gather=gather,
                                                   autocast=autocast, channels_last=channels_last,
                                                   loss_fn=eval_loss)
        val = classification_metrics(val_logits, val_labels, num_classes=num_classes)
        warm_after = in_warmup(protocol, state.step)
        if not warm_after:
            scheduler.step(val_loss)
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
            session.best_model_state = {k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()}
            session.val_logits = val_logits
        else:
            state.bad_epochs += 1
        record = {
            "epoch": epoch, "step": state.step,
            "train_loss": totals[0] / max(totals[2], 1), "train_accuracy": totals[1] / max(totals[2], 1),
            "val_loss": val_loss, "val_accuracy": val["accuracy"],
            "val_balanced_accuracy": val["balanced_accuracy"], "val_macro_f1": val["macro_f1"],
            "lr": optimizer.param_groups[0]["lr"], "warmup": float(warm_start), "improved": float(improved),
            "epoch_seconds": time.perf_counter() - started,
        }
        if val["auroc"] is not None:
            record["val_auroc"] = val["auroc"]
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


def _phase_lr(optimizer: torch.optim.Optimizer, protocol: FinetuneSettings, state: LoopState) -> float:
    """After warm-up: ``lr`` on the first post-warm-up step, then whatever the plateau schedule set."""
    if protocol.mode == "full" and state.step == protocol.warmup_iters:
        return protocol.lr
    if protocol.mode == "linear_probe" and state.step == 0:
        return protocol.lr
    return optimizer.param_groups[0]["lr"]
