"""Dense and multi-task kinds on the engine (issue #22): metrics against hand-computed values, the poly schedule,
the iteration rounds, masks moving with their image, and the iteration-based loop (learning, resume) on the
generated dense dataset. CPU, seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from transferbench.config import DenseSettings, FinetuneSettings, TaskSettings
from transferbench.data.synthetic_dense import generate
from transferbench.engine import loop
from transferbench.engine.data import CachedImages, RoundSampler, build_cache, eval_loader, read_manifests, train_loader
from transferbench.engine.tasks import kind_for_task
from transferbench.engine.tasks.base import PolyFactor
from transferbench.engine.tasks.dense import IGNORE, confusion_matrix, depth_scores, segmentation_scores
from transferbench.engine.tasks.multitask import MultiTask
from transferbench.models import build_model


# --------------------------------------------------------------------------- metrics by hand
def test_miou_ignores_unlabelled_pixels_and_absent_classes():
    target = np.array([[0, 0, 1, IGNORE], [1, 1, 2, IGNORE]], dtype=np.uint8)[None]
    predicted = np.array([[0, 1, 1, 3], [1, 1, 2, 0]], dtype=np.uint8)[None]  # the IGNORE pixels say anything
    # class 0: 1 hit, union 2 (pred 1 + target 2 - 1) -> 1/2; class 1: hits 3, union 4 -> 3/4; class 2: 1/1;
    # class 3: in neither the target nor the prediction of a labelled pixel -> not averaged
    scores = segmentation_scores(confusion_matrix(predicted, target, num_classes=4))
    assert scores["miou"] == pytest.approx((1 / 2 + 3 / 4 + 1) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 6)


def test_miou_sums_intersections_and_unions_over_the_whole_split():
    target = np.array([[[0, 0]], [[1, 1]]], dtype=np.uint8)
    predicted = np.array([[[0, 1]], [[1, 1]]], dtype=np.uint8)
    # class 0: hits 1, union 2; class 1: hits 2, union 3 (not the mean of per-image IoUs)
    assert segmentation_scores(confusion_matrix(predicted, target, 2))["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_depth_metrics_mask_invalid_pixels_and_average_per_image():
    target = np.array([[[2.0, 4.0, 0.0, 20.0]], [[1.0, 1.0, 1.0, np.nan]]])  # 0, above max_depth and NaN: invalid
    predicted = np.array([[[3.0, 4.0, 9.0, 9.0]], [[1.0, 1.0, 2.0, 5.0]]])
    scores = depth_scores(predicted, target, min_depth=1e-3, max_depth=10.0)
    rmse = (math.sqrt((1 + 0) / 2) + math.sqrt((0 + 0 + 1) / 3)) / 2
    absrel = ((1 / 2 + 0) / 2 + (0 + 0 + 1) / 3) / 2
    delta1 = ((0 + 1) / 2 + (1 + 1 + 0) / 3) / 2  # 3/2 = 1.5 and 2/1 = 2 are both >= 1.25
    assert scores == pytest.approx({"rmse": rmse, "absrel": absrel, "delta1": delta1})
    assert depth_scores(predicted[:, :, 3:], target[:, :, 3:], min_depth=1e-3, max_depth=10.0)["rmse"] is None


def _classification(classes):
    return kind_for_task(TaskSettings(dataset="d", split={"rule": "random"}), {"classes": list(classes)})


def test_routing_sends_each_image_to_one_head_and_a_misrouted_image_is_wrong():
    kind = MultiTask(("a", "b"), (_classification(["x", "y"]), _classification(["p", "q", "r"])), (0, 1), (1.0, 1.0),
                     routed=True)
    domain = np.array([0, 0, 0, 1, 1])
    targets = {"domain": domain, "a": np.array([0, 1, 1, -1, -1]), "b": np.array([-1, -1, -1, 2, 0])}
    outputs = {
        "a": np.array([[5.0, 0], [0, 5.0], [0, 5.0], [1, 0], [1, 0]]),  # head a: right on all three of its images
        "b": np.array([[0, 0, 1.0]] * 3 + [[0, 0, 5.0], [0, 5.0, 0]]),  # head b: right on image 3, wrong on 4
        # the router (logit > 0: dataset b) sends image 2 to head b by mistake
        "router": np.array([-3.0, -2.0, 4.0, 2.0, 3.0]),
    }
    scores = kind.evaluate(outputs, targets)
    assert scores["routing_accuracy"] == pytest.approx(4 / 5)
    assert scores["a.accuracy"] == pytest.approx(2 / 3)  # image 2's right answer does not count: misrouted
    assert scores["b.accuracy"] == pytest.approx(1 / 2)
    assert [m.name for m in kind.metrics][-1] == "routing_accuracy"


def test_poly_schedule_warms_up_linearly_from_warmup_lr_then_decays_to_zero():
    factor = PolyFactor(lr=1e-3, warmup_lr=1e-6, warmup_iters=10, max_iters=100, power=0.9)
    assert factor(0) * 1e-3 == pytest.approx(1e-6)
    assert factor(5) == pytest.approx((1 - 5 / 100) ** 0.9 * (1 - 0.5 * (1 - 1e-3)))
    assert factor(10) == pytest.approx((1 - 10 / 100) ** 0.9)
    assert factor(100) == 0.0
    values = [factor(t) for t in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_rounds_give_every_batches_then_the_rest_and_replay_by_seed():
    sampler = RoundSampler(5, batch_size=2, every=3, total=7, seed=0)
    lengths = []
    for epoch in (1, 2, 3):
        sampler.set_epoch(epoch)
        lengths.append(len(list(sampler)))
    assert lengths == [6, 6, 2]  # 3 + 3 + 1 batches of 2 = 7 iterations
    sampler.set_epoch(2)
    again = RoundSampler(5, batch_size=2, every=3, total=7, seed=0)
    again.set_epoch(2)
    assert list(sampler) == list(again) and sorted(set(list(sampler))) == [0, 1, 2, 3, 4]
    shards = [RoundSampler(5, batch_size=2, every=3, total=7, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert all(len(list(s)) == 6 for s in shards)


# --------------------------------------------------------------------------- the dense data path and loop
@pytest.fixture(scope="module")
def dense_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated dense dataset (48 images, 48 px) split 32/8/8 as the split stage writes manifests."""
    root = tmp_path_factory.mktemp("dense")
    meta = generate(root / "synthetic_dense", images=48, image_size=48, seed=0)
    meta = pd.read_csv(root / "synthetic_dense" / "metadata.csv")
    frame = pd.DataFrame({"filename": [str(root / "synthetic_dense" / f) for f in meta["filename"]],
                          "label": "scene", "group": meta["group"],
                          "mask": [str(root / "synthetic_dense" / f) for f in meta["mask"]],
                          "depth": [str(root / "synthetic_dense" / f) for f in meta["depth"]]})
    task_dir = root / "splits" / "dense"
    task_dir.mkdir(parents=True)
    for split, rows in {"train": slice(0, 32), "val": slice(32, 40), "test": slice(40, 48)}.items():
        frame.iloc[rows].to_csv(task_dir / f"{split}.csv", index=False)
    (task_dir / "summary.json").write_text(json.dumps({"classes": ["scene"]}))
    return root


DENSE = DenseSettings(num_classes=4, decoder_channels=16)
POLY = FinetuneSettings(optimizer="adamw", schedule="poly", lr=1e-3, warmup_iters=5, warmup_lr=1e-6, max_iters=45,
                        eval_every=15, batch_size=8, img_size=32, weight_decay=0.01)


def _kind(name: str):
    return kind_for_task(TaskSettings(dataset="synthetic_dense", kind=name, metric="miou" if name == "segmentation"
                                      else "rmse", split={"rule": "random"}, dense=DENSE), {})


def _pieces(root: Path, kind, *, backbone: str = "test_resnet", seed: int = 0, protocol: FinetuneSettings = POLY):
    from transferbench.config import BackboneSettings

    manifests = read_manifests(root / "splits", "dense")
    caches = {s: build_cache(manifests, s, kind=kind, side=36, cache_dir=root / "cache") for s in ("train", "val")}
    loop.seed_everything(seed)
    model = build_model(BackboneSettings(model=backbone, family="convnet", weights="none"), img_size=32,
                        head=lambda c: kind.head(c, POLY), features=kind.features)

    def data(split: str, train: bool) -> CachedImages:
        return CachedImages(caches[split], img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, train=train,
                            augment=kind.train_transforms(32, POLY) if train else None)

    return (model, train_loader(data("train", True), batch_size=8, seed=seed, rounds=(protocol.eval_every,
                                                                                        protocol.max_iters)),
            eval_loader(data("val", False), batch_size=8))


def test_a_mask_is_cropped_and_flipped_with_its_image(dense_splits):
    kind = _kind("segmentation")
    manifests = read_manifests(dense_splits / "splits", "dense")
    cache = build_cache(manifests, "train", kind=kind, side=36, cache_dir=dense_splits / "cache")
    blob = torch.load(cache, weights_only=True)
    assert blob["targets"].dtype == torch.uint8 and blob["targets"].shape == (32, 36, 36)
    data = CachedImages(cache, img_size=32, mean=(0.0,) * 3, std=(1.0,) * 3, train=True,
                        augment=kind.train_transforms(32, POLY))
    torch.manual_seed(3)

    def agreement(grey: torch.Tensor, mask: torch.Tensor) -> float:
        labelled = mask != IGNORE
        return float((grey[labelled] == (mask[labelled] == 0)).float().mean())

    moved, mirrored = [], []
    for i in range(16):
        image, mask, _ = data[i]
        # the background (class 0) is grey, the shapes coloured: a mask cropped and flipped with its image lies on
        # its pixels (up to the resizing's soft edges); the same mask mirrored does not
        grey = (image.max(0).values - image.min(0).values) < 0.08
        moved.append(agreement(grey, mask))
        mirrored.append(agreement(grey, mask.flip(-1)))
    assert np.mean(moved) > 0.93 and np.mean(moved) > np.mean(mirrored) + 0.05, (np.mean(moved), np.mean(mirrored))


def test_segmentation_learns_beats_the_majority_mask_and_resumes_a_round_exactly(dense_splits):
    kind = _kind("segmentation")
    model, train, val = _pieces(dense_splits, kind)
    session = loop.fit(model, kind=kind, train_loader=train, val_loader=val, protocol=POLY, seed=0)
    state = session.state
    assert state.step == 45 and state.epoch == 3 and state.stop_reason == "max_iters"
    assert [h["step"] for h in state.history] == [15, 30, 45]
    assert state.history[-1]["lr"] == 0.0  # the poly schedule ends at 0
    train_targets = torch.load(build_cache(read_manifests(dense_splits / "splits", "dense"), "train", kind=kind,
                                           side=36, cache_dir=dense_splits / "cache"), weights_only=True)["targets"]
    _, val_targets, _ = loop.predict(model, val, device=torch.device("cpu"), reduce=kind.reduce)
    _, floor = kind.trivial_baseline(train_targets.numpy(), val_targets)
    assert state.best_score > floor + 0.15, (state.best_score, floor)

    saved = {}

    def checkpoint_at_one(record, s):
        if record["epoch"] == 1:
            saved["blob"] = s.state_dict()
            return True

    model, train, val = _pieces(dense_splits, kind)
    loop.fit(model, kind=kind, train_loader=train, val_loader=val, protocol=POLY, seed=0, hooks=[checkpoint_at_one])
    saved["blob"]["loop"]["finished"] = False
    model, train, val = _pieces(dense_splits, kind)
    resumed = loop.fit(model, kind=kind, train_loader=train, val_loader=val, protocol=POLY, seed=0,
                       resume=saved["blob"])
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert resumed.state.resumed_at_epochs == [1]
    assert strip(resumed.state.history) == strip(state.history)


def test_depth_beats_the_mean_training_depth(dense_splits):
    kind = _kind("depth")
    protocol = POLY.model_copy(update={"max_iters": 90, "lr": 3e-3})  # the scale-invariant loss finds the scale late
    model, train, val = _pieces(dense_splits, kind, protocol=protocol)
    session = loop.fit(model, kind=kind, train_loader=train, val_loader=val, protocol=protocol, seed=0)
    train_targets = torch.load(build_cache(read_manifests(dense_splits / "splits", "dense"), "train", kind=kind,
                                           side=36, cache_dir=dense_splits / "cache"), weights_only=True)["targets"]
    outputs, val_targets, _ = loop.predict(model, val, device=torch.device("cpu"), reduce=kind.reduce)
    assert outputs.shape == val_targets.shape == (8, 32, 32)
    _, floor = kind.trivial_baseline(train_targets.numpy(), val_targets)
    assert session.state.best_score < 0.8 * floor, (session.state.best_score, floor)
