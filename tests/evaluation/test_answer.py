"""The answer's statistics: paired bootstrap, McNemar, z-scores, Spearman and the verdict text.

Expected values are worked out by hand (small enumerable cases) or with scipy/sklearn called directly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn import metrics as skm

from transferbench.errors import TransferbenchError
from transferbench.evaluation import answer
from transferbench.evaluation.answer import AnswerError

ACCURACY = answer.metric_statistic("classification", "accuracy")


def classification(labels: list[str], predictions: list[str], names: list[str] | None = None) -> pd.DataFrame:
    names = names or [f"img{i:03d}.png" for i in range(len(labels))]
    return pd.DataFrame({"filename": names, "label": labels, "prediction": predictions})


def hits(right: list[bool], names: list[str] | None = None) -> pd.DataFrame:
    """A classification table whose image i is classified right iff right[i]."""
    return classification(["cat"] * len(right), ["cat" if r else "dog" for r in right], names)


# --------------------------------------------------------------------------- metric_statistic
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_sklearn() -> None:
    table = classification(["a", "a", "a", "b", "b", "c"], ["a", "b", "a", "b", "c", "d"])
    y, p = table["label"], table["prediction"]
    assert answer.metric_statistic("classification", "accuracy")(table) == pytest.approx(3 / 6)
    assert answer.metric_statistic("classification", "balanced_accuracy")(table) == pytest.approx(
        skm.balanced_accuracy_score(y, p))
    balanced = answer.metric_statistic("classification", "balanced_accuracy")
    assert balanced(table) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert answer.metric_statistic("classification", "macro_f1")(table) == pytest.approx(
        skm.f1_score(y, p, labels=["a", "b", "c", "d"], average="macro", zero_division=0))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    table = classification(list(rng.choice(list("abcdef"), n)), list(rng.choice(list("abcdefgh"), n)))
    y, p = table["label"], table["prediction"]
    labels = sorted(set(y) | set(p))
    assert answer.metric_statistic("classification", "accuracy")(table) == pytest.approx(skm.accuracy_score(y, p))
    assert answer.metric_statistic("classification", "balanced_accuracy")(table) == pytest.approx(
        skm.balanced_accuracy_score(y, p))
    assert answer.metric_statistic("classification", "macro_f1")(table) == pytest.approx(
        skm.f1_score(y, p, labels=labels, average="macro", zero_division=0))


def test_age_and_dense_statistics() -> None:
    age = pd.DataFrame({"filename": ["a", "b", "c"], "age": [20.0, 30.0, 40.0], "prediction": [22.0, 37.0, 40.0],
                        "abs_error": [2.0, 7.0, 0.0]})
    assert answer.metric_statistic("age", "mae")(age) == pytest.approx(3.0)
    assert answer.metric_statistic("age", "cs5")(age) == pytest.approx(2 / 3)
    seg = pd.DataFrame({"filename": ["a", "b"], "miou": [0.2, 0.6], "pixel_accuracy": [0.5, 1.0]})
    assert answer.metric_statistic("segmentation", "miou")(seg) == pytest.approx(0.4)
    depth = pd.DataFrame({"filename": ["a", "b", "c"], "rmse": [1.0, 3.0, float("nan")], "absrel": [0.1, 0.3, 0.2],
                          "delta1": [0.9, 0.7, 0.8]})
    assert answer.metric_statistic("depth", "rmse")(depth) == pytest.approx(2.0)  # the NaN image skipped


@pytest.mark.parametrize(("kind", "metric"), [("classification", "auroc"), ("retrieval", "map"), ("age", "miou")])
def test_unsupported_metric_raises(kind: str, metric: str) -> None:
    assert not answer.can_recompute(kind, metric)
    with pytest.raises(AnswerError, match="cannot be recomputed from per-image predictions"):
        answer.metric_statistic(kind, metric)
    assert issubclass(AnswerError, TransferbenchError)


def test_can_recompute_known_metrics() -> None:
    for kind, metric in [("classification", "macro_f1"), ("age", "mae"), ("segmentation", "pixel_accuracy"),
                         ("depth", "delta1")]:
        assert answer.can_recompute(kind, metric)


# --------------------------------------------------------------------------- paired bootstrap
def test_bootstrap_two_images_enumerable() -> None:
    # A right on image 1 only, B right on none. Resampled A accuracy: 1 (both draws image 1, p 1/4),
    # 0.5 (p 1/2), 0 (p 1/4); B is always 0. The 2.5% and 97.5% percentiles are therefore 0 and 1.
    a, b = hits([True, False]), hits([False, False])
    result = answer.paired_bootstrap([a], [b], ACCURACY, n_resamples=4000, seed=3)
    assert result["difference"] == 0.5
    assert (result["low"], result["high"]) == (0.0, 1.0)
    assert result["significant"] is False
    assert result["n_images"] == 2 and result["n_seeds"] == 1 and result["n_resamples"] == 4000
    assert result["method"] == "paired bootstrap, percentile" and result["confidence"] == 0.95


def test_bootstrap_same_indices_for_both_backbones() -> None:
    # A and B identical: only if both are resampled with the same indices does the interval collapse to 0.
    a, b = hits([True, True, False, False]), hits([True, True, False, False])
    result = answer.paired_bootstrap([a, a], [b, b], ACCURACY, n_resamples=500)
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert result["significant"] is False


def test_bootstrap_observed_difference_averaged_over_seeds() -> None:
    names = ["a", "b", "c", "d"]
    a = [hits([True, True, True, False], names), hits([True, True, False, False], names)]  # 0.75, 0.5
    b = [hits([True, False, False, False], names), hits([False, False, False, False], names)]  # 0.25, 0
    # A rows shuffled: alignment is by filename, not by row order.
    a[1] = a[1].iloc[[3, 1, 0, 2]].reset_index(drop=True)
    result = answer.paired_bootstrap(a, b, ACCURACY, n_resamples=200)
    assert result["difference"] == pytest.approx((0.75 + 0.5) / 2 - (0.25 + 0.0) / 2)
    assert result["n_seeds"] == 2


def test_bootstrap_clearly_better_is_significant_and_reproducible() -> None:
    rng = np.random.default_rng(1)
    better = hits(list(rng.random(60) < 0.9))
    worse = hits(list(rng.random(60) < 0.3))
    first = answer.paired_bootstrap([better], [worse], ACCURACY, n_resamples=500, seed=7)
    assert first["significant"] is True and first["low"] > 0
    again = answer.paired_bootstrap([better], [worse], ACCURACY, n_resamples=500, seed=7)
    assert again == first
    other = answer.paired_bootstrap([better], [worse], ACCURACY, n_resamples=500, seed=8)
    assert (other["low"], other["high"]) != (first["low"], first["high"])
    reverse = answer.paired_bootstrap([worse], [better], ACCURACY, n_resamples=500, seed=7)
    assert reverse["significant"] is True and reverse["high"] < 0


def test_bootstrap_mismatched_images_raises() -> None:
    a = hits([True, False, True], ["x", "y", "z"])
    b = hits([True, False, True], ["x", "y", "w"])
    with pytest.raises(AnswerError, match="2 image"):
        answer.paired_bootstrap([a], [b], ACCURACY, n_resamples=10)
    with pytest.raises(AnswerError, match="same number"):
        answer.paired_bootstrap([a, a], [a], ACCURACY, n_resamples=10)
    with pytest.raises(AnswerError, match="more than once"):
        answer.paired_bootstrap([hits([True, True], ["x", "x"])], [hits([True, True], ["x", "x"])], ACCURACY)


# --------------------------------------------------------------------------- McNemar
def mcnemar_tables(a_only: int, b_only: int, both: int = 5, neither: int = 3) -> tuple[pd.DataFrame, pd.DataFrame]:
    right_a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    right_b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return hits(right_a), hits(right_b)


def test_mcnemar_exact_hand_computed() -> None:
    a, b = mcnemar_tables(1, 6)
    result = answer.mcnemar_test(a, b.iloc[::-1].reset_index(drop=True))  # row order must not matter
    assert (result["a_only"], result["b_only"], result["exact"], result["n_images"]) == (1, 6, True, 15)
    assert result["p_value"] == pytest.approx(2 * (1 + 7) / 128)


def test_mcnemar_chi_square_hand_computed() -> None:
    a, b = mcnemar_tables(30, 10)
    result = answer.mcnemar_test(a, b)
    assert result["exact"] is False
    statistic = (abs(30 - 10) - 1) ** 2 / (30 + 10)
    assert result["statistic"] == pytest.approx(statistic)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(statistic, 1))


def test_mcnemar_over_seeds_counts_significant() -> None:
    significant = mcnemar_tables(30, 10)
    not_significant = mcnemar_tables(1, 6)
    result = answer.mcnemar_over_seeds([significant[0], not_significant[0]], [significant[1], not_significant[1]])
    assert (result["significant_seeds"], result["n_seeds"], result["alpha"]) == (1, 2, 0.05)
    assert [r["a_only"] for r in result["per_seed"]] == [30, 1]


# --------------------------------------------------------------------------- across tasks
MEANS = pd.DataFrame({"r50": [0.80, 2.0, 0.50], "vit": [0.90, 1.0, 0.70], "convnext": [0.85, 3.0, np.nan],
                      "swin": [0.70, 1.5, 0.60]}, index=["cls", "depth", "seg"])
HIGHER = {"cls": True, "depth": False, "seg": True}


def test_family_zscores_match_scipy() -> None:
    z = answer.family_zscores(MEANS, HIGHER)
    cls = stats.zscore(MEANS.loc["cls"].to_numpy(), ddof=0)
    depth = -stats.zscore(MEANS.loc["depth"].to_numpy(), ddof=0)
    seg = stats.zscore(np.array([0.50, 0.70, 0.60]), ddof=0)  # r50, vit, swin (convnext did not run it)
    expected = {"r50": (cls[0] + depth[0] + seg[0]) / 3, "vit": (cls[1] + depth[1] + seg[1]) / 3,
                "convnext": (cls[2] + depth[2]) / 2, "swin": (cls[3] + depth[3] + seg[2]) / 3}
    assert list(z.index) == list(MEANS.columns)
    for backbone, value in expected.items():
        assert z[backbone] == pytest.approx(value)
    assert z["vit"] > z["convnext"]  # vit has the best depth (lowest RMSE) and classification


def test_family_zscores_skip_tied_tasks() -> None:
    means = pd.DataFrame({"a": [0.5, 1.0], "b": [0.5, 3.0], "c": [0.5, np.nan]}, index=["tied", "t"])
    z = answer.family_zscores(means, {"tied": True, "t": True})
    assert z["a"] == pytest.approx(-1.0) and z["b"] == pytest.approx(1.0)
    assert math.isnan(z["c"])  # its only task was a tie
    with pytest.raises(AnswerError, match="higher_is_better"):
        answer.family_zscores(means, {"t": True})


def test_ranking_correlations_match_scipy() -> None:
    corr = answer.ranking_correlations(MEANS, HIGHER)
    assert list(corr.index) == list(corr.columns) == ["cls", "depth", "seg"]
    assert np.diag(corr.to_numpy()).tolist() == [1.0, 1.0, 1.0]
    cls_depth = stats.spearmanr(MEANS.loc["cls"], -MEANS.loc["depth"]).statistic
    assert corr.loc["cls", "depth"] == pytest.approx(cls_depth) == pytest.approx(corr.loc["depth", "cls"])
    common = ["r50", "vit", "swin"]
    cls_seg = stats.spearmanr(MEANS.loc["cls", common], MEANS.loc["seg", common]).statistic
    assert corr.loc["cls", "seg"] == pytest.approx(cls_seg)


def test_ranking_correlations_nan_when_too_few_or_constant() -> None:
    means = pd.DataFrame({"a": [1.0, 2.0, 5.0], "b": [2.0, np.nan, 5.0], "c": [3.0, 1.0, 5.0]},
                         index=["x", "y", "flat"])
    corr = answer.ranking_correlations(means, {"x": True, "y": True, "flat": True})
    assert math.isnan(corr.loc["x", "y"])  # only a and c ran both
    assert math.isnan(corr.loc["x", "flat"])  # constant column
    assert corr.loc["y", "y"] == 1.0


def test_imagenet_correlation() -> None:
    top1 = {"a": 76.0, "b": 81.0, "c": 84.0, "d": 79.0, "e": None}
    ranks = {"a": 3.5, "b": 2.0, "c": 1.0, "d": 2.5, "e": 4.0}
    result = answer.imagenet_correlation(top1, ranks)
    expected = stats.spearmanr([76.0, 81.0, 84.0, 79.0], [3.5, 2.0, 1.0, 2.5])
    assert result["applies"] is True and result["n"] == 4 and result["reason"] is None
    assert result["rho"] == pytest.approx(expected.statistic) == pytest.approx(-1.0)  # better top-1, better rank
    assert result["p_value"] == pytest.approx(expected.pvalue)
    unknown = answer.imagenet_correlation({b: None for b in ranks}, ranks)
    assert unknown["applies"] is False and unknown["rho"] is None and unknown["n"] == 0
    assert "0 of 5" in unknown["reason"]
    two = answer.imagenet_correlation({"a": 76.0, "b": 81.0}, {"a": 1.0, "b": 2.0, "c": float("nan")})
    assert two["applies"] is False and two["n"] == 2 and "2 of 2" in two["reason"]


# --------------------------------------------------------------------------- verdict
def comparison(evaluation: str, winner: str, significant: bool | None, difference: float = 0.05,
               **extra: Any) -> dict[str, Any]:
    return {"evaluation": evaluation, "convnet": "r50", "transformer": "vit", "winner": winner,
            "significant": significant, "difference": difference, "low": difference - 0.02,
            "high": difference + 0.02, "metric": "accuracy", **extra}


def test_verdict_counts_and_significance() -> None:
    comps = [comparison("flowers", "transformer", True), comparison("pets", "transformer", False),
             comparison("cars", "convnet", False, -0.01),
             comparison("sop", "transformer", None, untested_reason="map cannot be recomputed")]
    text = answer.verdict(comps, family_ranks={"convnet": 2.25, "transformer": 1.5}, random_init=False,
                          zscores={"r50": -0.5, "vit": 0.7, "deit": None}, families={"r50": "convnet",
                                                                                     "vit": "transformer",
                                                                                     "deit": "transformer"})
    assert "RANDOM-INIT" not in text
    assert "Transformers rank higher on 3 of 4 evaluations (best Transformer vs best ConvNet), ConvNets on 1" in text
    assert "significant (95% paired bootstrap CI excludes 0) on 1 of them: flowers (Transformer better" in text
    assert "Of the 3 tested evaluations" in text
    assert "not significant on the others" in text
    assert "sop: map cannot be recomputed." in text
    assert "pets (" not in text and "cars (" not in text  # only the significant one is itemised
    assert "ConvNets 2.25, Transformers 1.50" in text
    assert "ConvNets -0.50, Transformers +0.70" in text


def test_verdict_none_significant_and_random_init() -> None:
    comps = [comparison("flowers", "convnet", False)]
    text = answer.verdict(comps, family_ranks={"convnet": 1.0, "transformer": None}, random_init=True)
    assert text.startswith("RANDOM-INIT (not pretrained) study: these numbers say nothing about pretrained transfer.")
    assert "Transformers rank higher on 0 of 1 evaluation (" in text
    assert "Of the 1 tested evaluation," in text
    assert "not significant (95% paired bootstrap CI includes 0) on any" in text
    assert "Transformers n/a" in text
    assert "z-score" not in text


def test_verdict_without_comparisons() -> None:
    text = answer.verdict([], family_ranks={}, random_init=False)
    assert "No evaluation" in text and "rank higher" not in text
