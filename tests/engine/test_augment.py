"""The batched augmentation on the training device (``engine.augment``, ``finetune.augment``): the protocol's
parameter distributions, seeding, geometry against torchvision's, per-pixel targets, and a fine-tune that
still learns with it (CPU, seconds)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from transferbench.config import DenseSettings, FinetuneSettings, TaskSettings
from transferbench.engine import augment as augment_module
from transferbench.engine.augment import AugmentParams, BatchAugment, batch_augment
from transferbench.engine.data import CachedImages, train_loader
from transferbench.engine.tasks import kind_for_task
from transferbench.stages.finetune import run_finetune

from .conftest import toy_settings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIDE, SIZE = 40, 32


def _augment(**kwargs) -> BatchAugment:
    return BatchAugment(SIZE, **{"rotation_degrees": 30.0, "hflip": True, "mean": MEAN, "std": STD, **kwargs})


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _params(top, left, angle, flip) -> AugmentParams:
    return AugmentParams(torch.tensor(top), torch.tensor(left), torch.tensor(angle, dtype=torch.float32),
                         torch.tensor(flip))


def _normalised(crop: torch.Tensor) -> torch.Tensor:
    """What the CPU path makes of a uint8 crop: torchvision's ToDtype(scale=True) then Normalize."""
    return v2.Normalize(list(MEAN), list(STD))(v2.ToDtype(torch.float32, scale=True)(crop))


def test_parameters_follow_the_protocol_distributions():
    n = 4000
    params = _augment().sample(n, SIDE, torch.Generator().manual_seed(0))
    # rotation uniform in [-30, 30] degrees
    assert stats.kstest(params.angle.numpy(), stats.uniform(loc=-30, scale=60).cdf).pvalue > 1e-3
    assert params.angle.abs().max() <= 30
    # flip with p = 0.5: a two-sided binomial test
    assert stats.binomtest(int(params.flip.sum()), n, 0.5).pvalue > 1e-3
    # crop corners uniform over every valid offset 0..SIDE-SIZE
    for corner in (params.top, params.left):
        counts = torch.bincount(corner, minlength=SIDE - SIZE + 1)
        assert len(counts) == SIDE - SIZE + 1 and bool((counts > 0).all())
        assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert stats.pearsonr(params.top.numpy(), params.left.numpy()).pvalue > 1e-3  # drawn independently
    off = BatchAugment(SIZE, rotation_degrees=0.0, hflip=False, mean=MEAN, std=STD).sample(
        200, SIDE, torch.Generator().manual_seed(0))
    assert not bool(off.flip.any()) and bool((off.angle == 0).all())


def test_same_seed_same_output_and_another_seed_differs():
    images, labels = _images(8), torch.arange(8)
    run = lambda seed: _augment()(images, labels, torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], labels)
    assert not torch.equal(first[0], other[0])


def test_without_rotation_or_flip_it_is_the_exact_crop_normalised_and_a_flip_is_torch_flip():
    images = _images(3)
    params = _params([0, 8, 3], [8, 0, 5], [0.0, 0.0, 0.0], [False, False, True])
    out, _ = _augment().apply(images, torch.zeros(3), params)
    assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
    for b in range(3):
        t, left = int(params.top[b]), int(params.left[b])
        expected = _normalised(images[b, :, t:t + SIZE, left:left + SIZE])
        if params.flip[b]:
            expected = torch.flip(expected, dims=[-1])
        # 1e-4: float rounding of the grid (1/255 of a grey level is ~0.017 here)
        torch.testing.assert_close(out[b], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("angle", [17.0, -25.0, 90.0])
def test_rotation_is_torchvisions_rotation_of_the_crop_with_zero_fill(angle):
    """The CPU path rotates the crop with bilinear interpolation and fills with 0: the same image, corners
    included (points outside the crop read 0, not the cached image's margin)."""
    images = _images(2)
    params = _params([2, 6], [7, 1], [angle, angle], [False, True])
    out, _ = _augment(mean=(0.0,) * 3, std=(1.0,) * 3).apply(images, torch.zeros(2), params)
    for b in range(2):
        t, left = int(params.top[b]), int(params.left[b])
        crop = images[b, :, t:t + SIZE, left:left + SIZE].float() / 255
        expected = TF.rotate(crop, angle, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)
        if params.flip[b]:
            expected = torch.flip(expected, dims=[-1])
        torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=0)
    if angle % 90:
        assert float(out[:, :, 0, 0].abs().max()) == 0.0  # a rotated corner is fill


def test_masks_and_depth_maps_move_with_their_image_and_keep_their_values():
    n = 6
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 3, 7, 255])
    masks = labels[torch.randint(0, 4, (n, SIDE, SIDE), generator=generator)]
    depth = torch.rand(n, SIDE, SIDE, generator=generator) * 10 + 0.5
    targets = {"seg": masks, "depth": depth, "label": torch.arange(n)}
    aug = _augment()
    params = aug.sample(n, SIDE, torch.Generator().manual_seed(4))
    _, moved = aug.apply(_images(n), targets, params)
    assert torch.equal(moved["label"], targets["label"])  # per-sample targets pass through
    assert moved["seg"].shape == (n, SIZE, SIZE) and moved["seg"].dtype == torch.int64
    # nearest neighbour: only values that were there, and 0 (the fill) where the rotation left the crop
    assert set(moved["seg"].unique().tolist()) <= {0, *labels.tolist()}
    assert set(moved["depth"].unique().tolist()) <= {0.0, *depth.unique().tolist()}
    # as the CPU path moves a tv_tensors.Mask: torchvision's nearest rotation of the crop, then the flip (a tie
    # between two source pixels may round the other way in float: a few pixels of 1024 at most)
    for b in range(n):
        t, left, angle = int(params.top[b]), int(params.left[b]), float(params.angle[b])
        for name in ("seg", "depth"):
            crop = targets[name][b, t:t + SIZE, left:left + SIZE][None].float()
            expected = TF.rotate(crop, angle, interpolation=v2.InterpolationMode.NEAREST, fill=0.0)[0]
            expected = torch.flip(expected, dims=[-1]) if params.flip[b] else expected
            assert (moved[name][b].float() != expected).float().mean() < 0.01, (name, b)
    # no rotation: exactly the crop (and its flip) of the maps
    plain = _params([1, 8, 0, 4, 2, 5], [0, 3, 8, 6, 1, 7], [0.0] * n, [False, True] * 3)
    _, exact = aug.apply(_images(n), targets, plain)
    for b in range(n):
        t, left = int(plain.top[b]), int(plain.left[b])
        for name in ("seg", "depth"):
            expected = targets[name][b, t:t + SIZE, left:left + SIZE]
            expected = torch.flip(expected, dims=[-1]) if plain.flip[b] else expected
            assert torch.equal(exact[name][b], expected), (name, b)


def test_a_training_cache_for_the_device_hands_out_uncropped_uint8(toy_splits):
    from transferbench.engine.data import build_cache, read_manifests

    settings = toy_settings(toy_splits)
    manifests = read_manifests(settings.data.splits_dir, "toy")
    kind = kind_for_task(settings.task("toy"), manifests.summary)
    cache = build_cache(manifests, "train", kind=kind, side=36, cache_dir=settings.data.cache_dir)
    raw = CachedImages(cache, img_size=32, mean=MEAN, std=STD, train=True, rotation_degrees=30.0, hflip=True,
                       device_augment=True)
    image, label, index = raw[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 36, 36) and torch.equal(image, raw.images[5])
    images, labels, _ = next(iter(train_loader(raw, batch_size=8, seed=0)))
    assert images.shape == (8, 3, 36, 36) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    evaluation = CachedImages(cache, img_size=32, mean=MEAN, std=STD, train=False, device_augment=True)
    assert evaluation[5][0].shape == (3, 32, 32)  # evaluation keeps its centre crop


def _kind(kind: str = "classification", **task):
    return kind_for_task(TaskSettings(dataset="d", kind=kind, split={"rule": "random"}, **task),
                         {"classes": ["a", "b"]})


def test_the_setting_and_the_task_kind_choose_the_path():
    protocol = FinetuneSettings(rotation_degrees=30.0, hflip=True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def choose(p: FinetuneSettings, kind, device: torch.device) -> BatchAugment | None:
        return batch_augment(p, kind, device=device, img_size=32, mean=MEAN, std=STD)

    classification = _kind()
    assert choose(protocol.model_copy(update={"augment": "cpu"}), classification, cuda) is None
    on_device = choose(protocol.model_copy(update={"augment": "device"}), classification, cpu)
    assert (on_device.rotation_degrees, on_device.hflip, on_device.img_size) == (30.0, True, 32)
    assert choose(protocol, classification, cuda) is not None  # auto: the device on CUDA
    assert (choose(protocol, classification, cpu) is not None) == (augment_module.CPU_AUTO == "device")
    # age's affine + shear has no batched form: the CPU path whatever the setting
    age = kind_for_task(TaskSettings(dataset="fgnet", kind="age", metric="mae", split={"rule": "by_group"},
                                     age={"max_age": 30}), {})
    assert choose(protocol.model_copy(update={"augment": "device"}), age, cuda) is None
    # the dense augmentation is crop and flip: the batched one without rotation
    dense = kind_for_task(TaskSettings(dataset="d", kind="segmentation", metric="miou", split={"rule": "random"},
                                       dense=DenseSettings(num_classes=4)), {})
    batched = choose(protocol.model_copy(update={"augment": "device"}), dense, cuda)
    assert (batched.rotation_degrees, batched.hflip) == (0.0, True)


def test_a_device_mode_finetune_learns_and_draws_other_augmentations_than_the_cpu_path(toy_splits, tmp_path):
    """Through the stage and the Ray Train worker (local mode): bright vs dark noise is learnt with the batched
    augmentation, and its first epoch differs from the per-sample path's (same seed, same initial weights and
    order), so the device path is what ran."""
    results = {}
    for mode, epochs in (("device", 4), ("cpu", 1)):
        settings = toy_settings(toy_splits, finetune={"augment": mode, "max_epochs": epochs, "lr": 1e-3},
                                ray={"storage_path": str(tmp_path / mode / "ray")},
                                tracking={"tracking_uri": f"sqlite:///{tmp_path / mode / 'mlruns.db'}",
                                          "artifact_location": str(tmp_path / mode / "artifacts")})
        results[mode] = run_finetune(settings, task="toy", backbone="test_resnet", seed=0,
                                     metrics_dir=tmp_path / mode / "metrics", plots_dir=tmp_path / mode / "plots")
    assert results["device"]["test_balanced_accuracy"] >= 0.9 and results["device"]["epochs_run"] == 4
    first = {mode: pd.read_csv(tmp_path / mode / "plots" / "toy" / "test_resnet" / "full" / "seed0-random-init.csv")
             .iloc[0] for mode in results}
    assert first["device"]["epoch"] == first["cpu"]["epoch"] == 1
    assert first["device"]["train_loss"] != first["cpu"]["train_loss"]
