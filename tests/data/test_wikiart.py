"""The wikiart adapter reads ArtGAN's layout (wikiart/<style>/<file>.jpg + wikiart_csv/style_*.csv):
label = style folder, each painting its own group, ArtGAN's style lists as official_split."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from PIL import Image

from transferbench.data import wikiart
from transferbench.data.registry import REQUIRED_COLUMNS, get_dataset
from transferbench.errors import DataError

PAINTINGS = ("Impressionism/claude-monet_the-tea-set.jpg", "Impressionism/edgar-degas_the-star-dancer-on-pointe.jpg",
             "Ukiyo_e/utagawa-kuniyoshi_woman-samurai.jpg", "Art_Nouveau_Modern/gustav-klimt_the-tree-of-life.jpg",
             "Art_Nouveau_Modern/aubrey-beardsley_isolde.jpg")


def build_wikiart(root: Path) -> dict:
    """Five paintings in three styles; the csv lists four of them (one train row has no image)."""
    for i, rel in enumerate(PAINTINGS):
        path = root / "wikiart" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i, 90, 120)).save(path, format="JPEG")
    csvs = root / "wikiart_csv"
    csvs.mkdir()
    (csvs / "style_class.txt").write_text("3 Art_Nouveau\n12 Impressionism\n26 Ukiyo_e\n")
    (csvs / "style_train.csv").write_text(f"{PAINTINGS[0]},12\n{PAINTINGS[2]},26\n{PAINTINGS[3]},3\n"
                                          "Impressionism/not-in-the-zip.jpg,12\n")
    (csvs / "style_val.csv").write_text(f"{PAINTINGS[1]},12\n")
    return {"rows": 5, "labels": {"Impressionism", "Ukiyo_e", "Art_Nouveau_Modern"},
            "official": {"train": 3, "val": 1, "": 1}}


def test_manifest_labels_paintings_by_style(tmp_path):
    expected = build_wikiart(tmp_path)
    frame = get_dataset("wikiart").manifest(tmp_path)
    assert set(REQUIRED_COLUMNS) <= set(frame.columns)
    assert len(frame) == expected["rows"] and set(frame["label"]) == expected["labels"]
    assert frame["group"].is_unique and frame["filename"].str.startswith((tmp_path / "wikiart").as_posix()).all()
    assert frame["official_split"].value_counts().to_dict() == expected["official"]
    row = frame.set_index("filename").loc[(tmp_path / "wikiart" / PAINTINGS[2]).as_posix()]
    assert row["label"] == "Ukiyo_e" and row["official_split"] == "train"


def test_the_style_lists_are_optional(tmp_path):
    build_wikiart(tmp_path)
    for path in (tmp_path / "wikiart_csv").iterdir():
        path.unlink()
    frame = get_dataset("wikiart").manifest(tmp_path)
    assert len(frame) == 5 and (frame["official_split"] == "").all()


def test_a_malformed_style_list_names_the_file_and_line(tmp_path):
    build_wikiart(tmp_path)
    (tmp_path / "wikiart_csv" / "style_val.csv").write_text(f"{PAINTINGS[1]},12\n{PAINTINGS[4]};3\n")
    with pytest.raises(DataError, match=r"style_val\.csv:2: malformed row"):
        get_dataset("wikiart").manifest(tmp_path)


def test_missing_images_are_an_error(tmp_path):
    with pytest.raises(DataError, match="WikiArt images not found"):
        get_dataset("wikiart").manifest(tmp_path)


def test_fetch_from_a_mirror_extracts_both_archives(tmp_path):
    upstream = tmp_path / "upstream"
    build_wikiart(upstream)
    mirror = tmp_path / "mirror" / "wikiart"
    mirror.mkdir(parents=True)
    for remote, folder in zip(wikiart.FILES, ("wikiart", "wikiart_csv")):
        with zipfile.ZipFile(mirror / remote.filename, "w") as archive:
            for path in sorted((upstream / folder).rglob("*")):
                archive.write(path, path.relative_to(upstream).as_posix())
    dest = tmp_path / "raw" / "wikiart"
    get_dataset("wikiart").fetch(dest, mirror=tmp_path / "mirror")
    frame = get_dataset("wikiart").manifest(dest)
    assert len(frame) == 5 and (frame["official_split"] != "").sum() == 4
