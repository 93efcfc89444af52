"""The split's probe and the training cache decode an image with one function (``imaging.decode_rgb``).

CMYK, 16-bit, palette-with-transparency, RGBA and EXIF-rotated images pass the probe, reach the cache with
the pixels expected of them, and train; a decompression bomb is quarantined by the split and refused by
the cache, never decoded; the COVID-19 mirror's images keep the pixels the committed baseline was made from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from transferbench.config import Settings, TaskSettings, build
from transferbench.data.images import DECOMPRESSION_BOMB, probe_image
from transferbench.imaging import decode_rgb
from transferbench.engine.data import build_cache, load_rgb, read_manifests
from transferbench.engine.tasks import kind_for_task
from transferbench.errors import DataError

WIDTH, HEIGHT = 48, 40  # not square, so a missed or wrong rotation shows in the size
SIDE = 36
CLASSES = ("a", "b")


def _gradient() -> np.ndarray:
    """An RGB image whose every pixel differs from its neighbours and from its mirror images."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 5, y * 6, (x * 3 + y * 2) % 256], axis=-1).astype(np.uint8)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _cmyk(path: Path) -> np.ndarray:
    cmyk = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    cmyk[:, : WIDTH // 2] = (0, 255, 255, 0)  # red
    cmyk[:, WIDTH // 2:] = (0, 0, 0, 128)  # 50 % black
    Image.fromarray(cmyk, "CMYK").save(path)
    expected = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    expected[:, : WIDTH // 2] = (255, 0, 0)
    expected[:, WIDTH // 2:] = 127
    return expected


def _sixteen_bit(path: Path) -> np.ndarray:
    values = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * 7 % 3001).astype(np.uint16)  # maximum 3000
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    gray = np.floor(values.astype(np.float64) * 255 / values.max()).astype(np.uint8)  # rescaled by its maximum
    return np.repeat(gray[:, :, None], 3, axis=2)


def _palette_transparent(path: Path) -> np.ndarray:
    palette = np.array([(200, 30, 40), (20, 180, 60), (10, 20, 230)], np.uint8)
    indices = (np.arange(WIDTH)[None, :] // 16 + np.arange(HEIGHT)[:, None] // 20) % 3
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette(palette.ravel().tolist())
    image.save(path, transparency=bytes([0, 255, 128]))  # a tRNS chunk: index 0 transparent, 2 half
    assert "transparency" in Image.open(path).info
    return palette[indices]  # the palette's colours, transparency dropped


def _rgba(path: Path) -> np.ndarray:
    rgb = _gradient()
    alpha = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :].repeat(HEIGHT, axis=0)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return rgb  # alpha dropped, as convert("RGB") does


def _exif_rotated_png(path: Path) -> np.ndarray:
    rgb = _gradient()
    Image.fromarray(rgb).save(path, exif=_exif(6))  # 6: shown rotated 90 degrees clockwise
    return np.rot90(rgb, k=-1)


def _exif_rotated_jpeg(path: Path) -> np.ndarray:
    rgb = _gradient()
    Image.fromarray(rgb).save(path, quality=100, subsampling=0, exif=_exif(8))  # 8: 90 degrees anticlockwise
    return np.rot90(rgb, k=1)


IMAGES = {  # name -> (file, writer returning the RGB pixels expected at full size)
    "cmyk": ("cmyk.tif", _cmyk),
    "sixteen_bit": ("sixteen_bit.png", _sixteen_bit),
    "palette_transparent": ("palette_transparent.png", _palette_transparent),
    "rgba": ("rgba.png", _rgba),
    "exif_rotated_png": ("exif_rotated.png", _exif_rotated_png),
    "exif_rotated_jpeg": ("exif_rotated.jpg", _exif_rotated_jpeg),
}
LOSSY = {"exif_rotated_jpeg"}


@pytest.fixture
def odd_images(tmp_path) -> dict[str, tuple[Path, np.ndarray]]:
    out = {}
    for name, (filename, write) in IMAGES.items():
        path = tmp_path / "images" / filename
        path.parent.mkdir(exist_ok=True)
        out[name] = (path, write(path))
    return out


def _assert_pixels(name: str, actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, name
    if name in LOSSY:
        assert np.abs(actual.astype(int) - expected).mean() < 2, name
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=name)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_probe_accepts_the_image_and_reports_its_upright_size(odd_images, name):
    path, expected = odd_images[name]
    probe = probe_image(path, min_side=32)
    assert probe.reason is None, probe.detail
    assert (probe.width, probe.height) == (expected.shape[1], expected.shape[0])
    _assert_pixels(name, np.asarray(decode_rgb(path)), expected)


def _write_task(root: Path, rows: dict[str, list[Path]]) -> Path:
    """A classification task 'toy' under <root>/splits, as the split stage writes it."""
    task_dir = root / "splits" / "toy"
    task_dir.mkdir(parents=True)
    for split, paths in rows.items():
        pd.DataFrame([{"filename": str(p), "label": CLASSES[i % 2], "group": f"{split}{i}", "location": "x"}
                      for i, p in enumerate(paths)]).to_csv(task_dir / f"{split}.csv", index=False)
    (task_dir / "summary.json").write_text(json.dumps({"classes": list(CLASSES)}))
    return root / "splits"


def _kind(manifests):
    return kind_for_task(TaskSettings(dataset="synthetic", split={"rule": "random"}), manifests.summary)


def test_the_cache_holds_the_expected_pixels_resized(odd_images, tmp_path):
    paths = [path for path, _ in odd_images.values()]
    manifests = read_manifests(_write_task(tmp_path, {"train": paths, "val": paths, "test": paths}), "toy")
    cache = build_cache(manifests, "val", kind=_kind(manifests), side=SIDE, cache_dir=tmp_path / "cache")
    cached = torch.load(cache, weights_only=True)["images"]
    for row, (name, (_, expected)) in enumerate(odd_images.items()):
        resized = ImageOps.fit(Image.fromarray(np.ascontiguousarray(expected)), (SIDE, SIDE),
                               method=Image.Resampling.BICUBIC)
        _assert_pixels(name, cached[row].permute(1, 2, 0).numpy(), np.asarray(resized))


@pytest.fixture
def bombs(tmp_path, monkeypatch) -> dict[str, Path]:
    """Two images over a lowered ``Image.MAX_IMAGE_PIXELS``: one where PIL only warns, one where it raises."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    out = {"warned": tmp_path / "warned.png", "raised": tmp_path / "raised.png"}
    Image.new("RGB", (50, 50), "white").save(out["warned"])  # 2500 px: > the limit, < twice it
    Image.new("RGB", (70, 70), "white").save(out["raised"])  # 4900 px: > twice the limit
    return out


@pytest.fixture
def no_decoding(monkeypatch) -> None:
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"decoded {self.filename or 'an image'}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("case", ["warned", "raised"])
def test_a_decompression_bomb_is_quarantined_and_refused_by_the_cache_undecoded(bombs, no_decoding, case,
                                                                                 tmp_path):
    probe = probe_image(bombs[case], min_side=32)
    assert probe.reason == DECOMPRESSION_BOMB and str(bombs[case]) in probe.detail
    assert probe.md5 is not None and probe.width is None
    with pytest.raises(Image.DecompressionBombError):  # what the served model catches
        load_rgb(bombs[case], SIDE)
    manifests = read_manifests(_write_task(tmp_path, {s: [bombs[case]] * 2 for s in ("train", "val", "test")}),
                               "toy")
    with pytest.raises(DataError, match=rf"val\.csv row 2: cannot read image {bombs[case]}: .*decompression bomb"):
        build_cache(manifests, "val", kind=_kind(manifests), side=SIDE, cache_dir=tmp_path / "cache")


def test_the_split_quarantines_a_decompression_bomb(synthetic, monkeypatch):
    from transferbench.data.layout import split_dir
    from transferbench.data.splits import split_task

    bomb = Path(synthetic.data.generated_dir) / "synthetic" / "images" / "g002_1.png"
    Image.new("RGB", (150, 150)).save(bomb)  # the others are 64 x 64
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    summary = split_task("synthetic", synthetic.task("synthetic"), synthetic.data)
    assert summary["excluded"] == {DECOMPRESSION_BOMB: 1}
    quarantine = pd.read_csv(split_dir(synthetic.data, "synthetic") / "quarantine.csv", dtype=str)
    assert quarantine[["reason", "filename"]].values.tolist() == [[DECOMPRESSION_BOMB, bomb.as_posix()]]


# load_rgb(path, 73) before decode_rgb existed, one mirror image of each format and mode (sha256 of the bytes)
MIRROR_PIXELS = {
    "000001-12.jpg": "6191690db0539f4a61da0029696de4d899f7deb6604512237d527dea9bd4bccf",  # PNG RGBA
    "000001-2.jpg": "eef113a7ba42d1fb71bc42300458f92d8f35be96c0cdd4c83e1439653615c438",  # JPEG RGB
    "00870a9c.jpg": "74709fd8adc10a52a9cf1ad51aa6fbe3c235acdc3da5786763f7426bf4ed70a4",  # JPEG L
    "1-s2.0-S0085253820303616-gr1_lrg-a.png": "ea0855084c7b9616b0cb9acf3279f4e50511ec23d6c36c472009ed9d975b8278",
    "10.1016-slash-j.crad.2020.04.002-b.png": "983b8388e27ca1c6e1537a503b0dce721fb27d0bce03a347e7a2e88669429167",
    "tpmd200203f2-a.png": "f8075b27ac6a88b67607e7bc86cbd8737ca267da9cfa55f1451ab848d3a682c9",  # PNG P
}


@pytest.mark.parametrize("filename", sorted(MIRROR_PIXELS))
def test_mirror_images_keep_their_cached_pixels(covid_mirror, filename):
    pixels = load_rgb(covid_mirror / "covid-chestxray" / "images" / filename, 73)
    assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest() == MIRROR_PIXELS[filename]


@pytest.mark.slow
def test_a_fine_tune_trains_on_them(odd_images, tmp_path):
    from engine.conftest import toy_params

    from transferbench.stages.finetune import run_finetune

    paths = [path for path, _ in odd_images.values()]
    splits = _write_task(tmp_path, {"train": paths * 3, "val": paths, "test": paths})
    settings: Settings = build(Settings, toy_params(tmp_path, finetune={"max_epochs": 2}))
    assert Path(settings.data.splits_dir) == splits
    result = run_finetune(settings, task="toy", backbone="test_resnet", seed=0, metrics_dir=tmp_path / "metrics",
                          plots_dir=tmp_path / "plots")
    assert result["epochs_run"] == 2 and np.isfinite(result["test_loss"])
    cached = {p.name.split("-")[0]: torch.load(p, weights_only=True)["images"]
              for p in (tmp_path / "cache" / "toy").glob("*.pt")}
    assert {split: len(images) for split, images in cached.items()} == {"train": 18, "val": 6, "test": 6}
