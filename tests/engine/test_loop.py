"""The pure fine-tuning loop: protocol phases, early stop, hooks, determinism, resume (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from transferbench.config import FinetuneSettings, TaskSettings
from transferbench.engine import loop
from transferbench.engine.data import CachedImages, build_cache, eval_loader, read_manifests, train_loader
from transferbench.engine.tasks import kind_for_task
from transferbench.models import build_model

from .conftest import toy_settings


def _pieces(root, *, protocol: FinetuneSettings, seed: int = 0, backbone: str = "test_resnet"):
    settings = toy_settings(root)
    manifests = read_manifests(settings.data.splits_dir, "toy")
    kind = kind_for_task(settings.task("toy"), manifests.summary)
    caches = {s: build_cache(manifests, s, kind=kind, side=36, cache_dir=settings.data.cache_dir)
              for s in ("train", "val")}
    loop.seed_everything(seed)
    model = build_model(settings.backbone(backbone), img_size=32, head=lambda n: kind.head(n, protocol))
    mk = lambda s, train: CachedImages(caches[s], img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=train,  # noqa: E731
                                       rotation_degrees=protocol.rotation_degrees, hflip=protocol.hflip)
    return (model, train_loader(mk("train", True), batch_size=protocol.batch_size, seed=seed),
            eval_loader(mk("val", False), batch_size=16))


PROTOCOL = FinetuneSettings(warmup_iters=3, max_epochs=3, batch_size=8, img_size=32, lr=1e-3)
KIND = kind_for_task(TaskSettings(dataset="synthetic", split={"rule": "random"}), {"classes": ["bright", "dark"]})


def _with(protocol: FinetuneSettings, **changes) -> FinetuneSettings:
    return protocol.model_copy(update=changes)


def test_warmup_trains_only_the_head_then_everything(toy_splits):
    protocol = _with(PROTOCOL, warmup_iters=6, max_epochs=1)  # 48 / 8 = 6 steps: all warm-up
    model, train, val = _pieces(toy_splits, protocol=protocol)
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    head_before = [p.detach().clone() for p in model.head.parameters()]
    bn_before = model.backbone.bn1.running_mean.clone()
    session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol, kind=KIND, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    assert torch.equal(bn_before, model.backbone.bn1.running_mean), "frozen backbone must keep its BN statistics"
    assert not all(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    assert session.state.history[0]["lr"] == protocol.warmup_lr and session.state.history[0]["warmup"] == 1.0

    protocol = _with(PROTOCOL, warmup_iters=2, max_epochs=1)
    model, train, val = _pieces(toy_splits, protocol=protocol)
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol, kind=KIND, seed=0)
    assert not all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    assert session.state.history[0]["lr"] == protocol.lr and session.state.step == 6


def test_linear_probe_never_touches_the_backbone(toy_splits):
    protocol = _with(PROTOCOL, mode="linear_probe", max_epochs=2)
    model, train, val = _pieces(toy_splits, protocol=protocol)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol, kind=KIND, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters()))
    assert [h["lr"] for h in session.state.history] == [protocol.lr] * 2


def test_early_stop_plateau_and_stopping_hook(toy_splits):
    # A tiny lr: val loss soon stops improving, so plateau halves the lr and early stop fires.
    protocol = _with(PROTOCOL, lr=1e-6, warmup_iters=0, plateau_patience=0, early_stop_patience=2,
                                   max_epochs=20)
    model, train, val = _pieces(toy_splits, protocol=protocol)
    session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol, kind=KIND, seed=0)
    assert session.state.stop_reason == "early_stop"
    assert session.state.epoch <= 1 + protocol.early_stop_patience + 1
    lrs = [h["lr"] for h in session.state.history]
    assert lrs[-1] < lrs[0], "ReduceLROnPlateau must have lowered the lr"

    seen = []

    def prune_after_two(record, session):  # the Optuna-style per-epoch callback
        seen.append(record["epoch"])
        return record["epoch"] >= 2

    model, train, val = _pieces(toy_splits, protocol=PROTOCOL)
    session = loop.fit(model, train_loader=train, val_loader=val, protocol=_with(PROTOCOL, max_epochs=9),
                       kind=KIND, seed=0, hooks=[prune_after_two])
    assert seen == [1, 2] and session.state.stop_reason == "hook"


class _Recording:
    """The train loader, keeping each batch's targets (``fit`` reads its sampler for ``set_epoch``)."""

    def __init__(self, loader):
        self.loader, self.sampler, self.targets = loader, loader.sampler, []

    def __iter__(self):
        for batch in self.loader:
            self.targets.append(batch[1])
            yield batch


def test_train_loss_and_accuracy_are_the_epochs_per_sample_means(toy_splits):
    protocol = _with(PROTOCOL, max_epochs=1, label_smoothing=0.1)
    model, train, val = _pieces(toy_splits, protocol=protocol)
    train = _Recording(train)
    logits = []
    model.register_forward_hook(lambda m, args, out: logits.append(out.detach().clone()) if m.training else None)
    session = loop.fit(model, train_loader=train, val_loader=val, protocol=protocol, kind=KIND, seed=0)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    assert len(logits) == len(train.targets) == 6
    total = sum(len(t) for t in train.targets)
    expected_loss = sum(float(loss_fn(x.float(), t)) * len(t) for x, t in zip(logits, train.targets)) / total
    expected_accuracy = sum(int((x.argmax(1) == t).sum()) for x, t in zip(logits, train.targets)) / total
    record = session.state.history[0]
    assert record["train_loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert record["train_accuracy"] == pytest.approx(expected_accuracy, rel=1e-12)


def _history(toy_splits, seed: int, **kwargs):
    model, train, val = _pieces(toy_splits, protocol=PROTOCOL, seed=seed)
    return loop.fit(model, train_loader=train, val_loader=val, protocol=PROTOCOL, kind=KIND, seed=seed, **kwargs)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def test_same_seed_same_metrics_and_resume_replays_exactly(toy_splits):
    straight = _history(toy_splits, 0)
    again = _history(toy_splits, 0)
    assert _strip(straight.state.history) == _strip(again.state.history)
    assert _strip(_history(toy_splits, 1).state.history) != _strip(straight.state.history)

    saved = {}

    def checkpoint_at_one(record, session):
        if record["epoch"] == 1:
            saved["blob"] = session.state_dict()
            return True

    _history(toy_splits, 0, hooks=[checkpoint_at_one])
    saved["blob"]["loop"]["finished"] = False  # as if the process had died right after the checkpoint
    resumed = _history(toy_splits, 0, resume=saved["blob"])
    assert resumed.state.resumed_at_epochs == [1]
    assert [h["epoch"] for h in resumed.state.history] == [1, 2, 3]
    assert _strip(resumed.state.history) == _strip(straight.state.history)
    assert math.isfinite(resumed.state.best_score)
