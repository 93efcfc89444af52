"""WikiArt, FG-NET and Oxford5k through the study's own commands (issue #21, "Done when"): fixtures in each
dataset's upstream layout, written by the test under data.raw_dir, then split -> validate -> finetune (WikiArt
in both modes, FG-NET's age kind) and retrieve (Oxford5k), and compare: the rank table carries the four
evaluations in the paper's groups. Real parts throughout (great-expectations, Ray Train local mode, a SQLite
MLflow store); tiny backbones, 2 epochs, 32 px: this checks the wiring, not the scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from transferbench.cli import main
from transferbench.engine.run_files import read_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STYLES = ("Impressionism", "Ukiyo_e", "Cubism")


def _image(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(0, 40, size=(40, 48, 3))
    Image.fromarray((np.asarray(colour) + noise).clip(0, 255).astype(np.uint8)).save(path, format="JPEG")


def _wikiart(raw: Path) -> None:
    """ArtGAN's layout: wikiart/<style>/<artist_title>.jpg (its csv lists are optional metadata)."""
    for s, style in enumerate(STYLES):
        for i in range(10):
            _image(raw / "wikiart" / "wikiart" / style / f"artist-{i}_title-{s}.jpg", (80 * s, 60, 200 - 80 * s), i)


def _fgnet(raw: Path) -> None:
    """FGNET/images/<subject>A<age>[letter].JPG: 12 people, 3 ages each (one a second image at an age)."""
    for subject in range(1, 13):
        for k, age in enumerate((2 + subject, 20 + subject, 40 + subject)):
            suffix = "a" if k == 2 and subject % 4 == 0 else ""
            _image(raw / "fgnet" / "FGNET" / "images" / f"{subject:03d}A{age:02d}{suffix}.JPG",
                   (3 * age, 3 * age, 3 * age), subject * 100 + k)


def _oxford5k(raw: Path) -> None:
    """oxbuild_images (images/<stem>.jpg) + gt_files_170407 (<landmark>_<n>_{query,good,ok,junk}.txt)."""
    root = raw / "oxford5k"
    for landmark, colour in (("all_souls", (200, 40, 40)), ("bodleian", (40, 40, 200))):
        for i in range(1, 6):
            _image(root / "images" / f"{landmark}_{i:06d}.jpg", colour, i)
        gt = root / "gt_files"
        gt.mkdir(parents=True, exist_ok=True)
        (gt / f"{landmark}_1_query.txt").write_text(f"oxc1_{landmark}_000001 2.0 3.0 40.0 36.0\n")
        (gt / f"{landmark}_1_good.txt").write_text(f"{landmark}_000001\n{landmark}_000002\n{landmark}_000003\n")
        (gt / f"{landmark}_1_ok.txt").write_text(f"{landmark}_000004\n")
        (gt / f"{landmark}_1_junk.txt").write_text(f"{landmark}_000005\n")
    for i in range(6):
        _image(root / "images" / f"random_{i:06d}.jpg", (40, 200, 40), 50 + i)


def test_wikiart_fgnet_oxford5k_run_through_split_validate_train_retrieve_and_compare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw"
    _wikiart(raw), _fgnet(raw), _oxford5k(raw)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["study"] = {"name": "paper-datasets", "tasks": ["wikiart", "fgnet"], "backbones": ["test_resnet"],
                       "seeds": [0], "retrieval_tasks": ["oxford5k"]}
    params["data"].update(raw_dir=str(raw), splits_dir=str(tmp_path / "splits"), cache_dir=str(tmp_path / "cache"),
                          reports_dir=str(tmp_path / "reports"))
    params["tasks"]["fgnet"]["split"].update(test_groups=3, val_groups=2)  # 12 people: 3 test, 2 val, 7 train
    params["finetune"].update(max_epochs=2, img_size=32, batch_size=8)
    params["ray"]["storage_path"] = str(tmp_path / "ray_results")
    params["tracking"].update(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
                              artifact_location=str(tmp_path / "art"), system_metrics=False, log_model=False)
    params["compare"].update(metrics_dir=str(tmp_path / "metrics"), ranks_file=str(tmp_path / "ranks.json"),
                             learning_floors={})
    params["sensitivity"].update(tasks=[], backbones=[], reports_dir=str(tmp_path / "sensitivity"),
                                 metrics_dir=str(tmp_path / "sensitivity_metrics"))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    run = ["--params", str(path)]

    for task in ("wikiart", "fgnet"):
        assert main([*run, "split", task]) == 0
        assert main([*run, "validate", task]) == 0
    summary = json.loads((tmp_path / "splits" / "fgnet" / "summary.json").read_text())
    assert summary["groups"] == {"train": 7, "val": 2, "test": 3}  # by individual: no person in two splits
    for task in ("wikiart", "fgnet"):
        assert main([*run, "finetune", "--task", task, "--backbone", "test_resnet"]) == 0
    assert main([*run, "retrieve", "--task", "oxford5k", "--backbone", "test_resnet"]) == 0
    assert main([*run, "compare"]) == 0

    table = json.loads((tmp_path / "reports" / "rank_table.json").read_text())
    assert {e: (t["task"], t["mode"], t["group"]) for e, t in table["tasks"].items()} == {
        "wikiart": ("wikiart", "full", "open-domain"),
        "wikiart:linear_probe": ("wikiart", "linear_probe", "linear evaluation"),
        "fgnet": ("fgnet", "full", "face"),
        "oxford5k": ("oxford5k", "frozen", "retrieval"),
    }
    assert table["tasks"]["fgnet"]["metric"] == "mae" and table["tasks"]["fgnet"]["higher_is_better"] is False
    assert table["tasks"]["oxford5k"]["n_note"].startswith("deterministic")
    oxford = read_run(tmp_path / "metrics", "oxford5k", "test_resnet", mode="frozen")
    assert oxford["n_queries"] == 2 and oxford["n_database"] == 16 and 0 < oxford["test_map"] <= 1
    assert "wikiart" in table["gain_from_full_finetuning"]
    # the numbers dvc metrics shows: one backbone ranked first in all four evaluations, no Friedman test
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks == {"average_rank": {"families": {f: v["average_rank"] for f, v in table["families"].items()},
                                      "backbones": {"test_resnet": 1.0}},
                     "n_evaluations": 4, "friedman_p_value": None}
    assert table["backbones"]["test_resnet"]["average_rank"] == 1.0
