"""Whose representations transfer better, with uncertainty: the statistics behind the study's answer.

Pure functions on tables already in memory (no file or MLflow I/O); ``study_answer`` feeds them.

- ``metric_statistic``: a test metric recomputed from one run's per-image predictions table (one row per
  test image), so that it can be recomputed on resampled images. Classification: accuracy, balanced
  accuracy and macro F1 as scikit-learn defines them (counted with numpy for speed; the tests check they
  equal sklearn's); age: MAE (mean ``abs_error``) and CS(5) (share with ``abs_error`` <= 5 years);
  segmentation (``miou``, ``pixel_accuracy``) and depth (``rmse``, ``absrel``, ``delta1``): the mean of
  per-image values, images without a value (NaN) skipped. For dense tasks this is not the
  logged dataset metric (mIoU there may pool a confusion matrix over all pixels), but it is a fair paired
  comparison of two backbones on the same images. Metrics that are not a function of per-image rows
  (AUROC needs scores, retrieval mAP needs the gallery) raise ``AnswerError``; ``can_recompute`` says so
  up front.
- ``paired_bootstrap``: Efron's nonparametric bootstrap (Efron & Tibshirani 1993, "An Introduction to the
  Bootstrap", ch. 13 percentile intervals) of the difference A - B, paired over test images: each
  resample draws image indices with replacement once and applies the same indices to every seed of both
  backbones, so image difficulty cancels and seed-to-seed variation is averaged as in the reported mean.
  The interval is the percentile interval of the resampled differences; it is "significant" when it
  excludes 0.
- ``mcnemar_test``: McNemar's (1947) test on the discordant pairs of two classifiers on the same images
  (A right and B wrong vs B right and A wrong): the exact two-sided binomial test when there are fewer
  than 25 discordant pairs, otherwise chi-square with continuity correction, (|b - c| - 1)^2 / (b + c)
  on 1 degree of freedom (statsmodels). ``mcnemar_over_seeds`` runs it per seed pair.
- ``family_zscores``: Battle of the Backbones (Goldblum et al. 2023) aggregation: per task, the
  backbones' mean scores are z-scored across backbones (ddof 0, oriented so higher = better), then each
  backbone's z-scores are averaged over the tasks it ran. z-scores put tasks with different spreads on one
  scale, which average ranks do not.
- ``ranking_correlations``: Spearman rank correlation between two tasks' backbone scores: do tasks agree
  on which backbone is better?
- ``imagenet_correlation``: Spearman between ImageNet top-1 and average transfer rank: does ImageNet
  accuracy predict transfer? Rank 1 is best, so "better on ImageNet transfers better" shows as a
  *negative* rho.
- ``verdict``: one plain-text paragraph generated from those numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

from transferbench.errors import TransferbenchError

CS_YEARS = 5  # CS(5), as the age task logs it (engine.tasks.age.WITHIN_YEARS)
EXACT_BELOW = 25  # McNemar: exact binomial test below this many discordant pairs
MIN_SPEARMAN = 3
METHOD = "paired bootstrap, percentile"
RANDOM_INIT_LABEL = "RANDOM-INIT (not pretrained) study: these numbers say nothing about pretrained transfer."
FAMILY_LABELS = {"convnet": "ConvNets", "transformer": "Transformers"}


class AnswerError(TransferbenchError):
    """The answer's statistics cannot be computed from the tables given (the message says why)."""


Statistic = Callable[[pd.DataFrame], float]


# --------------------------------------------------------------------------- metrics from predictions
def _columns(table: pd.DataFrame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise AnswerError(f"{what} needs column(s) {', '.join(missing)} in the predictions table; "
                          f"it has {', '.join(map(str, table.columns))}")


def _classes(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    _columns(table, ("label", "prediction"), "a classification metric")
    return table["label"].astype(str).to_numpy(), table["prediction"].astype(str).to_numpy()


def _counts(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class (the union of labels and predictions present): true count, predicted count, true positives.

    Counted with numpy rather than through sklearn, which is ~10x slower per call and runs once per
    resample, seed and backbone; the tests check the results equal sklearn's.
    """
    label, prediction = _classes(table)
    codes, uniques = pd.factorize(np.concatenate([label, prediction]))
    k, n = len(uniques), len(label)
    true, predicted = codes[:n], codes[n:]
    return (np.bincount(true, minlength=k), np.bincount(predicted, minlength=k),
            np.bincount(true[true == predicted], minlength=k))


def _accuracy(table: pd.DataFrame) -> float:
    """sklearn.metrics.accuracy_score."""
    label, prediction = _classes(table)
    return float(np.mean(label == prediction)) if len(label) else math.nan


def _balanced_accuracy(table: pd.DataFrame) -> float:
    """sklearn.metrics.balanced_accuracy_score: mean recall over the classes present in the labels."""
    true, _, hits = _counts(table)
    present = true > 0
    return float(np.mean(hits[present] / true[present])) if present.any() else math.nan


def _macro_f1(table: pd.DataFrame) -> float:
    """sklearn.metrics.f1_score(average="macro", zero_division=0), labels = union of labels and predictions."""
    true, predicted, hits = _counts(table)
    if not len(true):
        return math.nan
    return float(np.mean(2 * hits / (true + predicted)))  # every class of the union has true + predicted > 0


def _mae(table: pd.DataFrame) -> float:
    _columns(table, ("abs_error",), "mae")
    return float(table["abs_error"].astype(float).mean())


def _cs5(table: pd.DataFrame) -> float:
    _columns(table, ("abs_error",), "cs5")
    errors = table["abs_error"].astype(float)
    return float((errors <= CS_YEARS).mean()) if len(errors) else math.nan


def _column_mean(column: str) -> Statistic:
    def mean_of_per_image(table: pd.DataFrame) -> float:
        _columns(table, (column,), column)
        return float(table[column].astype(float).mean())  # NaN (image without a value) skipped

    mean_of_per_image.__name__ = f"mean_{column}"
    return mean_of_per_image


STATISTICS: dict[str, dict[str, Statistic]] = {
    "classification": {"accuracy": _accuracy, "balanced_accuracy": _balanced_accuracy, "macro_f1": _macro_f1},
    "age": {"mae": _mae, "cs5": _cs5},
    "segmentation": {m: _column_mean(m) for m in ("miou", "pixel_accuracy")},
    "depth": {m: _column_mean(m) for m in ("rmse", "absrel", "delta1")},
}


def can_recompute(kind: str, metric: str) -> bool:
    """Whether ``metric`` of a ``kind`` task can be recomputed from its per-image predictions table."""
    return metric in STATISTICS.get(kind, {})


def metric_statistic(kind: str, metric: str) -> Statistic:
    """The test metric as a function of a per-run predictions table (one row per test image).

    Dense kinds (segmentation, depth) give the mean of per-image values. Raises ``AnswerError`` for a
    metric that cannot be recomputed from per-image predictions (e.g. ``auroc``, retrieval ``map``).
    """
    if not can_recompute(kind, metric):
        known = ", ".join(f"{k}: {'/'.join(v)}" for k, v in STATISTICS.items())
        raise AnswerError(f"metric {metric!r} of a {kind!r} task cannot be recomputed from per-image predictions "
                          f"(recomputable: {known})")
    return STATISTICS[kind][metric]


# --------------------------------------------------------------------------- aligning tables
def _align(tables: Sequence[tuple[str, pd.DataFrame]], key: str) -> list[pd.DataFrame]:
    """The tables sorted by ``key``; all must cover the same set of ``key`` values, each once."""
    aligned: list[pd.DataFrame] = []
    reference: set[Any] | None = None
    first = ""
    for name, table in tables:
        if key not in table.columns:
            raise AnswerError(f"predictions table {name} has no {key!r} column")
        keys = table[key]
        if keys.duplicated().any():
            raise AnswerError(f"predictions table {name} lists {int(keys.duplicated().sum())} {key} value(s) "
                              f"more than once, e.g. {keys[keys.duplicated()].iloc[0]!r}")
        current = set(keys)
        if reference is None:
            reference, first = current, name
        elif current != reference:
            missing, extra = len(reference - current), len(current - reference)
            raise AnswerError(f"predictions table {name} covers different test images than {first}: "
                              f"{missing + extra} image(s) differ ({missing} missing, {extra} extra); "
                              f"a paired comparison needs the same test images")
        aligned.append(table.sort_values(key, kind="stable").reset_index(drop=True))
    return aligned


# --------------------------------------------------------------------------- paired bootstrap
def paired_bootstrap(a: Sequence[pd.DataFrame], b: Sequence[pd.DataFrame], statistic: Statistic, *,
                     n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                     key: str = "filename") -> dict[str, Any]:
    """Percentile bootstrap interval of mean-over-seeds statistic(A) - mean-over-seeds statistic(B).

    ``a`` and ``b``: per-seed predictions tables of the two backbones, the same seeds in the same order.
    Each resample draws test-image indices with replacement once and applies them to every table.
    """
    if len(a) != len(b) or not a:
        raise AnswerError(f"paired bootstrap needs the same number (>= 1) of seed tables per backbone; "
                          f"got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise AnswerError(f"confidence must be in (0, 1); got {confidence}")
    if n_resamples < 1:
        raise AnswerError(f"n_resamples must be at least 1; got {n_resamples}")
    named = [(f"A seed #{i + 1}", t) for i, t in enumerate(a)] + [(f"B seed #{i + 1}", t) for i, t in enumerate(b)]
    aligned = _align(named, key)
    tables_a, tables_b = aligned[:len(a)], aligned[len(a):]
    n = len(tables_a[0])
    if n == 0:
        raise AnswerError("paired bootstrap needs at least one test image; the predictions tables are empty")

    def difference(rows: np.ndarray | None) -> float:
        def pick(t: pd.DataFrame) -> pd.DataFrame:
            return t if rows is None else t.iloc[rows]

        return (float(np.mean([statistic(pick(t)) for t in tables_a]))
                - float(np.mean([statistic(pick(t)) for t in tables_b])))

    rng = np.random.default_rng(seed)
    diffs = np.array([difference(rng.integers(0, n, size=n)) for _ in range(n_resamples)])
    finite = diffs[np.isfinite(diffs)]
    if not len(finite):
        raise AnswerError("every bootstrap resample gave an undefined (NaN) statistic")
    tail = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(finite, [tail, 1 - tail]))
    return {"difference": difference(None), "low": low, "high": high, "confidence": confidence,
            "n_resamples": n_resamples, "n_valid_resamples": int(len(finite)), "n_images": n,
            "n_seeds": len(a), "seed": seed, "method": METHOD, "significant": bool(low > 0 or high < 0)}


# --------------------------------------------------------------------------- McNemar
def mcnemar_test(a: pd.DataFrame, b: pd.DataFrame, *, key: str = "filename") -> dict[str, Any]:
    """McNemar's test of two classifiers on the same test images (aligned by ``key``).

    ``a_only``: images A classifies right and B wrong; ``b_only``: the reverse. Exact binomial test when
    ``a_only + b_only`` < 25, else chi-square with continuity correction.
    """
    table_a, table_b = _align([("A", a), ("B", b)], key)
    label_a, pred_a = _classes(table_a)
    label_b, pred_b = _classes(table_b)
    if not np.array_equal(label_a, label_b):
        raise AnswerError(f"tables A and B disagree on the label of {int((label_a != label_b).sum())} image(s)")
    right_a, right_b = pred_a == label_a, pred_b == label_b
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    both, neither = int((right_a & right_b).sum()), int((~right_a & ~right_b).sum())
    exact = a_only + b_only < EXACT_BELOW
    result = mcnemar([[both, a_only], [b_only, neither]], exact=exact, correction=True)
    return {"a_only": a_only, "b_only": b_only, "both_right": both, "both_wrong": neither,
            "statistic": float(result.statistic), "p_value": float(result.pvalue), "exact": exact,
            "n_images": len(table_a)}


def mcnemar_over_seeds(a_tables: Sequence[pd.DataFrame], b_tables: Sequence[pd.DataFrame], *,
                       alpha: float = 0.05) -> dict[str, Any]:
    """``mcnemar_test`` per seed pair; ``significant_seeds``: how many have p < ``alpha``."""
    if len(a_tables) != len(b_tables):
        raise AnswerError(f"McNemar over seeds needs the same seeds for both backbones; "
                          f"got {len(a_tables)} and {len(b_tables)} tables")
    per_seed = [mcnemar_test(ta, tb) for ta, tb in zip(a_tables, b_tables, strict=True)]
    return {"per_seed": per_seed, "significant_seeds": sum(r["p_value"] < alpha for r in per_seed),
            "n_seeds": len(per_seed), "alpha": alpha}


# --------------------------------------------------------------------------- across tasks
def _oriented(means: pd.DataFrame, higher_is_better: Mapping[str, bool]) -> pd.DataFrame:
    """``means`` (tasks x backbones) with lower-is-better tasks negated, so higher = better everywhere."""
    missing = [t for t in means.index if t not in higher_is_better]
    if missing:
        raise AnswerError(f"no metric direction (higher_is_better) for task(s) {', '.join(map(str, missing))}")
    signs = pd.Series({t: 1.0 if higher_is_better[t] else -1.0 for t in means.index})
    return means.astype(float).mul(signs, axis=0)


def family_zscores(means: pd.DataFrame, higher_is_better: Mapping[str, bool]) -> pd.Series:
    """Per-backbone mean z-score over the tasks it ran (Battle of the Backbones); higher = better.

    Per task, scores are z-scored across the backbones that ran it (ddof 0); a task on which every backbone
    ties (standard deviation 0) is skipped. NaN for a backbone with no z-score.
    """
    oriented = _oriented(means, higher_is_better)
    rows = []
    for task, row in oriented.iterrows():
        values = row.to_numpy(dtype=float)
        ran = values[~np.isnan(values)]
        if len(ran) < 2 or np.std(ran) == 0:
            continue
        rows.append(pd.Series(stats.zscore(values, ddof=0, nan_policy="omit"), index=row.index, name=task))
    if not rows:
        return pd.Series(np.nan, index=means.columns, dtype=float)
    return pd.DataFrame(rows).mean(axis=0, skipna=True).reindex(means.columns).astype(float)


def ranking_correlations(means: pd.DataFrame, higher_is_better: Mapping[str, bool]) -> pd.DataFrame:
    """Tasks x tasks Spearman correlation of the backbones' (oriented) scores over the backbones both ran.

    NaN with fewer than 3 common backbones or a constant score column; 1.0 on the diagonal.
    """
    oriented = _oriented(means, higher_is_better)
    tasks = list(oriented.index)
    out = pd.DataFrame(np.nan, index=tasks, columns=tasks, dtype=float)
    for i, first in enumerate(tasks):
        out.loc[first, first] = 1.0
        for second in tasks[i + 1:]:
            pair = oriented.loc[[first, second]].T.dropna()
            x, y = pair[first].to_numpy(), pair[second].to_numpy()
            if len(pair) < MIN_SPEARMAN or np.ptp(x) == 0 or np.ptp(y) == 0:
                continue
            rho = float(stats.spearmanr(x, y).statistic)
            out.loc[first, second] = out.loc[second, first] = rho
    return out


def _known(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def imagenet_correlation(top1: Mapping[str, float | None], average_rank: Mapping[str, float | None]) -> dict[str, Any]:
    """Spearman between ImageNet top-1 and average transfer rank over backbones with both known.

    Rank 1 = best, so "higher ImageNet top-1 transfers better" shows as a negative ``rho``. Applies only
    with at least 3 such backbones and neither column constant.
    """
    ranked = [b for b, r in average_rank.items() if _known(r)]
    both = [b for b in ranked if _known(top1.get(b))]
    out: dict[str, Any] = {"applies": False, "n": len(both), "rho": None, "p_value": None, "reason": None,
                           "backbones": both}
    if len(both) < MIN_SPEARMAN:
        out["reason"] = (f"ImageNet top-1 known for {len(both)} of {len(ranked)} backbones with an average rank; "
                         f"Spearman needs at least {MIN_SPEARMAN}")
        return out
    x = np.array([float(top1[b]) for b in both])  # type: ignore[arg-type]
    y = np.array([float(average_rank[b]) for b in both])  # type: ignore[arg-type]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        out["reason"] = f"{'ImageNet top-1' if np.ptp(x) == 0 else 'average rank'} is the same for every backbone"
        return out
    result = stats.spearmanr(x, y)
    out.update({"applies": True, "rho": float(result.statistic), "p_value": float(result.pvalue)})
    return out


# --------------------------------------------------------------------------- the verdict
def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _family(name: str) -> str:
    return FAMILY_LABELS.get(name, name)


def _number(value: Any, fmt: str = ".4g") -> str:
    return "n/a" if value is None or not _known(float(value)) else format(float(value), fmt)


def _join(items: Sequence[str]) -> str:
    return "; ".join(items)


def _confidence(comparisons: Sequence[Mapping[str, Any]]) -> float:
    for c in comparisons:
        level = c.get("confidence", (c.get("bootstrap") or {}).get("confidence"))
        if level is not None:
            return float(level)
    return 0.95


def _significant_item(c: Mapping[str, Any]) -> str:
    better = {"convnet": "ConvNet better", "transformer": "Transformer better"}.get(str(c.get("winner")), "tie")
    difference = _number(c.get("difference"), "+.4g")
    return (f"{c['evaluation']} ({better}: {c.get('metric', 'metric')} difference {difference}, "
            f"CI [{_number(c.get('low'))}, {_number(c.get('high'))}])")


def verdict(comparisons: Sequence[Mapping[str, Any]], *, family_ranks: Mapping[str, float | None], random_init: bool,
            zscores: Mapping[str, float | None] | None = None, families: Mapping[str, str] | None = None) -> str:
    """One plain-text paragraph stating the answer from the numbers (best Transformer vs best ConvNet)."""
    parts: list[str] = [RANDOM_INIT_LABEL] if random_init else []
    n = len(comparisons)
    if n == 0:
        parts.append("No evaluation was run by both a ConvNet and a Transformer, so the families are not compared "
                     "head to head.")
    else:
        wins = {w: sum(c.get("winner") == w for c in comparisons) for w in ("transformer", "convnet", "tie")}
        line = (f"Transformers rank higher on {wins['transformer']} of {_count(n, 'evaluation')} "
                f"(best Transformer vs best ConvNet), ConvNets on {wins['convnet']}")
        parts.append(line + (f", tied on {wins['tie']}." if wins["tie"] else "."))
        tested = [c for c in comparisons if c.get("significant") is not None]
        significant = [c for c in tested if c.get("significant")]
        label = f"{_confidence(comparisons) * 100:g}% paired bootstrap CI"
        if not tested:
            parts.append("None could be tested for significance.")
        elif not significant:
            parts.append(f"Of the {_count(len(tested), 'tested evaluation')}, the difference is not significant "
                         f"({label} includes 0) on any.")
        else:
            rest = "" if len(significant) == len(tested) else "; not significant on the others"
            parts.append(f"Of the {_count(len(tested), 'tested evaluation')}, the difference is significant "
                         f"({label} excludes 0) on {len(significant)} of them: "
                         f"{_join([_significant_item(c) for c in significant])}{rest}.")
        untested = [c for c in comparisons if c.get("significant") is None]
        if untested:
            names = [f"{c['evaluation']}: {c['untested_reason']}" if c.get("untested_reason") else str(c["evaluation"])
                     for c in untested]
            parts.append(f"Not tested ({_count(len(untested), 'evaluation')}, no paired test possible): "
                         f"{_join(names)}.")
    if family_ranks:
        ranks = ", ".join(f"{_family(f)} {_number(r, '.2f')}" for f, r in family_ranks.items())
        parts.append(f"Average rank by family (1 = best): {ranks}.")
    if zscores is not None and families is not None:
        by_family: dict[str, list[float]] = {}
        for backbone, family in families.items():
            z = zscores.get(backbone)
            by_family.setdefault(family, [])
            if z is not None and _known(float(z)):
                by_family[family].append(float(z))
        if by_family:
            text = ", ".join(f"{_family(f)} {_number(float(np.mean(v)), '+.2f') if v else 'n/a'}"
                             for f, v in by_family.items())
            parts.append(f"Mean z-score by family (Battle of the Backbones; higher = better): {text}.")
    return " ".join(parts)
