"""Retrieval scoring: Oxford's compute_ap.cpp average precision (checked against hand arithmetic),
cosine ranking, the random-ranking floor, feature extraction with a real timm model, and a
random-init backbone beating random rankings on synthetic_retrieval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from transferbench.data.oxford5k import database_images, ground_truth
from transferbench.data.synthetic_retrieval import generate
from transferbench.evaluation.retrieval import (Query, extract_features, figures, mean_average_precision,
                                                mean_precision_recall, oxford_average_precision, precision_recall,
                                                random_ranking_map, rank_database)

POSITIVES = {"a", "b", "c"}


def test_average_precision_follows_the_oxford_trapezoid_rule():
    # Non-junk items in order: a+ x b+ y c+ ("j" is junk and skipped). After each item:
    #   a: recall 1/3, precision 1/1 -> (1/3 - 0)   * (1   + 1)  / 2 = 1/3
    #   x: recall 1/3, precision 1/2 -> 0
    #   b: recall 2/3, precision 2/3 -> (2/3 - 1/3) * (1/2 + 2/3) / 2 = 7/36
    #   y: recall 2/3, precision 2/4 -> 0
    #   c: recall 3/3, precision 3/5 -> (1 - 2/3)   * (1/2 + 3/5) / 2 = 11/60
    expected = 1 / 3 + 7 / 36 + 11 / 60  # = 128/180 = 0.7111...
    assert oxford_average_precision(["a", "x", "j", "b", "y", "c"], POSITIVES, {"j"}) == pytest.approx(expected)
    # Junk is removed from the ranking: wherever it sits, the AP is the same ...
    assert oxford_average_precision(["j", "a", "x", "b", "j2", "y", "c"], POSITIVES, {"j", "j2"}) == \
        pytest.approx(expected)
    # ... whereas the same item counted as a negative lowers it.
    assert oxford_average_precision(["a", "x", "j", "b", "y", "c"], POSITIVES, set()) < expected


def test_a_perfect_ranking_scores_one():
    # Each positive at the top adds (1/n) * (1 + 1) / 2, since old_precision starts at 1.0.
    assert oxford_average_precision(["c", "a", "b", "x", "y"], POSITIVES, set()) == pytest.approx(1.0)
    assert oxford_average_precision(["j", "a", "b", "c"], POSITIVES, {"j"}) == pytest.approx(1.0)


def test_the_original_trapezoid_quirks_are_kept():
    # One positive at rank 2: step 1 adds 0 and sets old_precision to 0, step 2 adds
    # (1 - 0) * (0 + 1/2) / 2 = 1/4 (the usual non-interpolated AP would be 1/2).
    assert oxford_average_precision(["x", "a"], {"a"}, set()) == pytest.approx(0.25)
    # A positive missing from the ranking is never recalled: 2 of 3 found at ranks 1, 2.
    assert oxford_average_precision(["a", "b", "x"], POSITIVES, set()) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one positive"):
        oxford_average_precision(["a"], set(), set())


def test_precision_recall_skips_junk():
    precision, recall = precision_recall(["a", "x", "j", "b"], {"a", "b"}, {"j"})
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])


def test_mean_precision_recall_interpolates_each_query():
    queries = [Query("q_1", "a", (0, 0, 1, 1), frozenset({"a", "b"}), frozenset(), frozenset()),
               Query("q_2", "c", (0, 0, 1, 1), frozenset({"c"}), frozenset(), frozenset())]
    rankings = {"q_1": ["x", "a", "b"], "q_2": ["c", "x", "y"]}
    recall, precision = mean_precision_recall(queries, rankings, points=3)
    np.testing.assert_allclose(recall, [0.0, 0.5, 1.0])
    # q_1: precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> interpolated 2/3 everywhere; q_2: 1 everywhere.
    np.testing.assert_allclose(precision, [(2 / 3 + 1) / 2] * 3)


def test_database_is_ranked_by_cosine_similarity():
    database = np.array([[1.0, 0.0], [10.0, 10.0], [0.0, 3.0], [0.0, -1.0], [2.0, 2.0]])
    query = np.array([[1.0, 0.9]])
    # Cosine, not dot product: [10, 10] and [2, 2] tie (same direction) and keep database order,
    # ahead of [1, 0]; [0, -1] is last.
    assert rank_database(query, database).tolist() == [[1, 4, 0, 2, 3]]
    queries = [Query("q_1", "n1", (0, 0, 1, 1), frozenset({"n1", "n4"}), frozenset({"n2"}), frozenset({"n0"}))]
    names = ["n0", "n1", "n2", "n3", "n4"]
    mean_ap, per_query, rankings = mean_average_precision(queries, query, database, names)
    assert rankings == {"q_1": ["n1", "n4", "n0", "n2", "n3"]}
    # n0 is junk: n1+ n4+ n2+ -> a perfect ranking.
    assert per_query == {"q_1": pytest.approx(1.0)} and mean_ap == pytest.approx(1.0)
    with pytest.raises(ValueError, match="database names"):
        mean_average_precision(queries, query, database, names[:-1])


def test_random_ranking_map_is_seeded_and_low():
    names = [f"n{i}" for i in range(40)]
    queries = [Query(f"q_{k}", names[k], (0, 0, 1, 1), frozenset(names[k:k + 3]), frozenset(), frozenset())
               for k in range(4)]
    first = random_ranking_map(queries, names, seed=3, repeats=50)
    assert first == random_ranking_map(queries, names, seed=3, repeats=50)
    assert 0.0 < first < 0.3  # 3 positives among 40


def _write_images(root: Path) -> list[Path]:
    paths = []
    for i, colour in enumerate([(250, 10, 10), (240, 20, 30), (10, 10, 250)]):
        image = Image.new("RGB", (80, 60), colour)
        image.paste((10, 250, 10), (0, 0, 30, 30))
        paths.append(root / f"img{i}.png")
        image.save(paths[-1])
    return paths


def test_extract_features_gives_unit_rows_and_crops_to_the_box(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0, pretrained=False)
    model.train()
    paths = _write_images(tmp_path)
    features = extract_features(model, paths, img_size=32, resize=36, batch_size=2)
    assert features.shape == (3, model.num_features)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    assert model.training  # the caller's mode is restored
    again = extract_features(model, paths, img_size=32, resize=36, batch_size=3)
    np.testing.assert_allclose(features, again, atol=1e-5)  # eval mode: batch composition does not matter
    cropped = extract_features(model, paths[:1], boxes=[(0, 0, 30, 30)], img_size=32, resize=36)
    assert not np.allclose(cropped[0], features[0], atol=1e-3)  # the box is all green
    with pytest.raises(ValueError, match="boxes"):
        extract_features(model, paths, boxes=[None], img_size=32, resize=36)


@pytest.mark.parametrize("model_name", ["test_resnet", "test_vit"])
def test_random_init_backbone_beats_random_rankings_on_synthetic_retrieval(tmp_path, model_name):
    generate(tmp_path / "sr", landmarks=5, views_per_landmark=8, queries_per_landmark=2, distractors=20,
             image_size=64, seed=0)
    queries = ground_truth(tmp_path / "sr")
    images = database_images(tmp_path / "sr")
    names = list(images)
    torch.manual_seed(0)
    extra = {"img_size": 64} if "vit" in model_name else {}
    model = timm.create_model(model_name, num_classes=0, pretrained=False, **extra)
    database = extract_features(model, [images[n] for n in names], img_size=64, resize=64, batch_size=64)
    query = extract_features(model, [images[q.image] for q in queries], boxes=[q.bbox for q in queries],
                             img_size=64, resize=64)
    mean_ap, per_query, rankings = mean_average_precision(queries, query, database, names)
    floor = random_ranking_map(queries, names, seed=0)
    assert floor < 0.25
    assert mean_ap > floor + 0.3, (mean_ap, floor)
    assert per_query == {q.name: oxford_average_precision(rankings[q.name], q.positives, q.junk) for q in queries}
    written = figures(queries, rankings, images, tmp_path / "figures", per_query=per_query,
                      mean_curve=mean_precision_recall(queries, rankings), title=model_name, top_k=4, grid_queries=2)
    assert [p.name for p in written] == ["pr_curve.png", "top_k.png"]
    assert all(p.stat().st_size > 0 for p in written)
