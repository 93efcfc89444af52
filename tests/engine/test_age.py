"""Age estimation: the mean-variance loss and the metrics against hand arithmetic, targets' errors, the
FG-NET adapter on its upstream file layout, the synthetic age generator, and a tiny model that learns age."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from transferbench.config import FinetuneSettings, TaskSettings
from transferbench.data import fgnet, synthetic_age  # noqa: F401  (registers "fgnet", "synthetic_age")
from transferbench.data.registry import REQUIRED_COLUMNS, get_dataset
from transferbench.engine.tasks import age as age_kind  # noqa: F401  (registers "age")
from transferbench.engine.tasks import kind_for_task
from transferbench.engine.tasks.age import Age, MeanVarianceLoss
from transferbench.errors import DataError

KIND = Age(max_age=2, lambda_mean=0.2, lambda_var=0.05)
PROTOCOL = FinetuneSettings()
LN3 = math.log(3)


# --------------------------------------------------------------------------- loss
def test_mean_variance_loss_by_hand():
    # Ages 0, 1, 2. Sample 1: equal logits, p = (1/3, 1/3, 1/3), true age 0.
    #   cross-entropy = ln 3; m = (0 + 1 + 2)/3 = 1; v = (1 + 0 + 1)/3 = 2/3; ½(m - y)² = ½.
    # Sample 2: logits (0, 0, ln 2), so p = (1/4, 1/4, 1/2), true age 2.
    #   cross-entropy = -ln ½ = ln 2; m = 1/4 + 2·1/2 = 5/4;
    #   v = (25/16)/4 + (1/16)/4 + (9/16)/2 = 44/64 = 11/16; ½(m - y)² = ½·(3/4)² = 9/32.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]])
    targets = torch.tensor([0, 2])
    cross_entropy = (LN3 + math.log(2)) / 2
    mean_term = (1 / 2 + 9 / 32) / 2  # 25/64
    variance_term = (2 / 3 + 11 / 16) / 2  # 65/96
    expected = cross_entropy + 0.2 * mean_term + 0.05 * variance_term
    assert MeanVarianceLoss(2, 0.2, 0.05)(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    # without its two terms it is plain cross-entropy
    assert MeanVarianceLoss(2, 0.0, 0.0)(logits, targets).item() == pytest.approx(cross_entropy, rel=1e-6)


def test_loss_is_float32_from_bf16_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]], dtype=torch.bfloat16, requires_grad=True)
    loss = KIND.loss(PROTOCOL)(logits, torch.tensor([0, 2]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


# --------------------------------------------------------------------------- metrics
def test_mae_and_cs5_by_hand():
    kind = Age(max_age=20, lambda_mean=0.2, lambda_var=0.05)
    # One-hot-like logits: each softmax puts all but ~1e-40 of its mass on one age, so m is that age.
    predicted = [3, 10, 20, 0]
    outputs = np.full((4, 21), -100.0)
    outputs[np.arange(4), predicted] = 0.0
    targets = np.array([3, 15, 14, 0])
    # errors 0, 5 (exactly 5: within), 6 (not within), 0 -> MAE 11/4, CS(5) 3/4
    got = kind.evaluate(outputs, targets)
    assert got["mae"] == pytest.approx(11 / 4)
    assert got["cs5"] == pytest.approx(3 / 4)
    # statistic: the batch's summed absolute error (11) from the same outputs as torch tensors
    assert kind.statistic(torch.tensor(outputs), torch.tensor(targets)).item() == pytest.approx(11.0)
    table = kind.prediction_table(["a", "b", "c", "d"], outputs, targets)
    assert list(table.columns) == ["filename", "age", "prediction", "abs_error"]
    assert table["abs_error"].tolist() == pytest.approx([0, 5, 6, 0])


def test_trivial_baseline_predicts_the_training_mean():
    # training ages 2, 4, 9: mean 5; test ages 1 and 8 are 4 and 3 years off -> MAE 3.5
    assert KIND.trivial_baseline(np.array([2, 4, 9]), np.array([1, 8])) == ("training-mean age", pytest.approx(3.5))
    assert KIND.trivial_baseline(np.array([], dtype=np.int64), np.array([1])) is None


def test_prediction_is_the_softmax_mean_not_the_argmax():
    # p = (1/4, 1/4, 1/2) over ages 0..2: the arg-max says 2, the mean says 5/4
    outputs = np.array([[0.0, 0.0, math.log(2)]])
    assert KIND.evaluate(outputs, np.array([1]))["mae"] == pytest.approx(1 / 4)


def test_kind_from_task_settings_and_selection():
    task = TaskSettings(dataset="fgnet", kind="age", metric="mae", split={"rule": "by_group"},
                        age={"max_age": 30, "lambda_mean": 0.1})
    kind = kind_for_task(task, {})
    assert isinstance(kind, Age) and kind.describe() == {"max_age": 30, "lambda_mean": 0.1, "lambda_var": 0.05}
    assert kind.head(8, PROTOCOL)[-1].out_features == 31
    assert kind.selection.name == "mae" and not kind.selection.higher_is_better
    assert not Age.metric("val_mae").higher_is_better and Age.metric("cs5").higher_is_better


def test_figure_is_written(tmp_path):
    outputs = np.zeros((3, 3))
    [path] = KIND.figures(outputs, np.array([0, 1, 2]), tmp_path, title="fgnet / test_resnet")
    assert path.name == "age_scatter_test.png" and path.stat().st_size > 0


def test_train_transforms_crop_to_size():
    transform = Age(max_age=69, lambda_mean=0.2, lambda_var=0.05).train_transforms(32, PROTOCOL)
    image = torch.randint(0, 256, (3, 36, 36), dtype=torch.uint8)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


# --------------------------------------------------------------------------- targets
def test_targets_read_the_age_column():
    frame = pd.DataFrame({"filename": ["a", "b", "c"], "age": [0, 2, 1]})
    assert KIND.targets(frame, Path("m.csv")).tolist() == [0, 2, 1]
    strings = pd.DataFrame({"age": ["2", "0"]})
    assert KIND.targets(strings, Path("m.csv")).tolist() == [2, 0]


@pytest.mark.parametrize("bad", [3, -1, 1.5, float("nan"), "two"])
def test_targets_name_the_manifest_and_row(bad):
    frame = pd.DataFrame({"filename": ["a", "b"], "age": [1, bad]}, dtype=object)
    with pytest.raises(DataError, match=r"train\.csv row 3: age .* not an integer in 0\.\.2"):
        KIND.targets(frame, Path("splits/fgnet/train.csv"))


def test_targets_without_an_age_column():
    with pytest.raises(DataError, match=r"train\.csv: no 'age' column"):
        KIND.targets(pd.DataFrame({"label": ["1"]}), Path("train.csv"))


# --------------------------------------------------------------------------- FG-NET
def build_fgnet(root: Path) -> dict:
    """The upstream archive's layout: FGNET/images/<subject>A<age>[letter].JPG (plus its points/ folder)."""
    images = root / "FGNET" / "images"
    images.mkdir(parents=True)
    for name in ("001A02.JPG", "001A02a.JPG", "002A10.JPG", "001A43.jpg"):
        Image.new("RGB", (40, 48), (120, 100, 90)).save(images / name, format="JPEG")
    (root / "FGNET" / "points").mkdir()
    (root / "FGNET" / "points" / "001a02.pts").write_text("version: 1\n")
    return {"rows": 4, "labels": {"2", "10", "43"}}


def test_fgnet_parses_subject_age_and_suffix(tmp_path):
    build_fgnet(tmp_path)
    frame = get_dataset("fgnet").manifest(tmp_path)
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    names = [Path(f).name for f in frame["filename"]]
    assert names == ["001A02.JPG", "001A02a.JPG", "001A43.jpg", "002A10.JPG"]
    assert frame["subject"].tolist() == ["001", "001", "001", "002"]
    assert frame["group"].tolist() == frame["subject"].tolist()
    assert frame["age"].tolist() == [2, 2, 43, 10]
    assert frame["label"].tolist() == ["2", "2", "43", "10"]
    assert frame["suffix"].tolist() == ["", "a", "", ""]
    assert frame["source_row"].tolist() == [1, 2, 3, 4]
    assert frame["filename"].str.startswith(tmp_path.as_posix()).all()
    # the ages the adapter reads are targets the kind accepts
    assert Age(max_age=69, lambda_mean=0.2, lambda_var=0.05).targets(frame, Path("m.csv")).tolist() == [2, 2, 43, 10]


@pytest.mark.parametrize("name", ["001A2.JPG", "01A02.JPG", "001B02.JPG", "001A02ab.JPG", "x001A02.jpg"])
def test_fgnet_bad_name_is_named(tmp_path, name):
    build_fgnet(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "FGNET" / "images" / name, format="JPEG")
    with pytest.raises(DataError, match=rf"FG-NET: .*{re.escape(name)}: file name is not"):
        get_dataset("fgnet").manifest(tmp_path)


def test_fgnet_without_images(tmp_path):
    with pytest.raises(DataError, match="no JPEG images"):
        get_dataset("fgnet").manifest(tmp_path)


# --------------------------------------------------------------------------- synthetic age
def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_age_is_deterministic(tmp_path):
    args = dict(individuals=4, images_per_individual=3, max_age=20, image_size=32, seed=5)
    synthetic_age.generate(tmp_path / "a", **args)
    synthetic_age.generate(tmp_path / "b", **args)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and len(_tree(tmp_path / "a")) == 13
    synthetic_age.generate(tmp_path / "c", **{**args, "seed": 6})
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")


def test_synthetic_age_manifest(tmp_path):
    synthetic_age.generate(tmp_path, individuals=4, images_per_individual=3, max_age=20, image_size=32, seed=0)
    frame = get_dataset("synthetic_age").manifest(tmp_path)
    assert {*REQUIRED_COLUMNS, "age", "subject"} <= set(frame.columns) and len(frame) == 12
    assert frame["group"].nunique() == 4 and (frame.groupby("group")["age"].nunique() == 3).all()
    assert frame["label"].tolist() == [str(a) for a in frame["age"]]
    assert frame["age"].between(0, 20).all()
    with Image.open(frame["filename"][0]) as image:
        assert image.size == (32, 32)


# --------------------------------------------------------------------------- learning
def test_tiny_model_learns_synthetic_age(tmp_path):
    """Random-init test_resnet, the real loop and data path: test MAE beats predicting the training mean."""
    from transferbench.config import BackboneSettings
    from transferbench.engine import loop
    from transferbench.engine.data import CachedImages, build_cache, eval_loader, read_manifests, train_loader
    from transferbench.models import build_model

    max_age, size = 69, 48
    synthetic_age.generate(tmp_path / "data", individuals=24, images_per_individual=6, max_age=max_age,
                           image_size=size, seed=0)
    frame = get_dataset("synthetic_age").manifest(tmp_path / "data")
    split = frame["group"].map(lambda g: "test" if g < "ind004" else "val" if g < "ind007" else "train")
    task_dir = tmp_path / "splits" / "age"
    task_dir.mkdir(parents=True)
    for name in ("train", "val", "test"):
        frame[split == name].to_csv(task_dir / f"{name}.csv", index=False)
    (task_dir / "summary.json").write_text("{}")

    kind = Age(max_age=max_age, lambda_mean=0.2, lambda_var=0.05)
    protocol = FinetuneSettings(warmup_iters=0, max_epochs=12, batch_size=16, img_size=40, lr=3e-3,
                                early_stop_patience=12, rotation_degrees=0.0)
    manifests = read_manifests(tmp_path / "splits", "age")
    caches = {s: build_cache(manifests, s, kind=kind, side=size, cache_dir=tmp_path / "cache")
              for s in ("train", "val", "test")}
    stats = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
    loop.seed_everything(0)
    model = build_model(BackboneSettings(model="test_resnet", family="convnet", weights="none", preset="tiny"),
                        img_size=40, head=lambda n: kind.head(n, protocol))
    train = train_loader(CachedImages(caches["train"], img_size=40, train=True, hflip=True, **stats),
                         batch_size=protocol.batch_size, seed=0)
    val = eval_loader(CachedImages(caches["val"], img_size=40, train=False, **stats), batch_size=64)
    session = loop.fit(model, kind=kind, train_loader=train, val_loader=val, protocol=protocol, seed=0)
    assert "val_mae" in session.state.history[0] and "val_cs5" in session.state.history[0]
    assert session.state.best_score == min(r["val_mae"] for r in session.state.history)

    model.load_state_dict(session.best_model_state)
    test = eval_loader(CachedImages(caches["test"], img_size=40, train=False, **stats), batch_size=64)
    outputs, targets, _ = loop.predict(model, test, device=torch.device("cpu"))
    _, baseline = kind.trivial_baseline(frame[split == "train"]["age"].to_numpy(), targets)
    mae = kind.evaluate(outputs, targets)["mae"]
    assert mae < 0.5 * baseline, f"test MAE {mae:.2f} vs {baseline:.2f} predicting the training mean"
