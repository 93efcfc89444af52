"""The study's answer with uncertainty: whose representations transfer better, and how sure is that?

Per evaluation (a column of the rank table), the best ConvNet against the best Transformer (by mean
test score over seeds) on the same test images: a paired bootstrap interval of the metric difference
(``answer.paired_bootstrap``: test images resampled alike for every seed of both), and for
classification McNemar's test per seed. Across evaluations, Battle-of-the-Backbones aggregates:
per-backbone z-scores, the Spearman correlation between evaluations' backbone rankings, and ImageNet
top-1 against average transfer rank. ``answer.verdict`` turns the numbers into one paragraph.

The per-image predictions come from each run's ``predictions/test_predictions.csv`` (logged by the
fine-tune); ``predictions`` is how the caller reads them, by MLflow run id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from transferbench.evaluation import answer
from transferbench.evaluation.results import FinetuneResult

FAMILIES = ("convnet", "transformer")
SCHEMA = "transferbench.answer/1"


def _best(cells: Mapping[str, Mapping[str, Any]], backbones: Sequence[str], higher_is_better: bool) -> str | None:
    """The backbone of ``backbones`` with the best mean (ties: the first in study order); None if none ran."""
    ran = [b for b in backbones if b in cells and cells[b]["mean"] is not None and not math.isnan(cells[b]["mean"])]
    if not ran:
        return None
    sign = 1 if higher_is_better else -1
    return max(ran, key=lambda b: (sign * cells[b]["mean"], -ran.index(b)))


def _tables(runs: Sequence[FinetuneResult], predictions: Callable[[str], pd.DataFrame],
            component: str | None) -> list[pd.DataFrame]:
    """Each run's per-image test predictions (``predictions`` raises ``AnswerError`` for a run without them)."""
    tables = []
    for run in runs:
        table = predictions(run.mlflow_run_id)
        if component is not None and "task" in table.columns:  # a multitask run's table covers every component
            table = table[table["task"] == component].drop(columns="task")
        tables.append(table.reset_index(drop=True))
    return tables


def compare_evaluation(evaluation: str, entry: Mapping[str, Any], *, families: Mapping[str, str],
                       kind: str, results: Sequence[FinetuneResult], predictions: Callable[[str], pd.DataFrame],
                       resamples: int, seed: int, confidence: float, alpha: float) -> dict[str, Any] | None:
    """Best ConvNet vs best Transformer on one evaluation; None when a family did not run it."""
    cells, higher = entry["backbones"], entry["higher_is_better"]
    best = {f: _best(cells, [b for b, fam in families.items() if fam == f], higher) for f in FAMILIES}
    if None in best.values():
        return None
    convnet, transformer = best["convnet"], best["transformer"]
    c_mean, t_mean = cells[convnet]["mean"], cells[transformer]["mean"]
    winner = "tie" if c_mean == t_mean else (
        "transformer" if (t_mean > c_mean) == higher else "convnet")
    out: dict[str, Any] = {
        "evaluation": evaluation, "metric": entry["metric"], "higher_is_better": higher, "kind": kind,
        "convnet": convnet, "transformer": transformer, "convnet_mean": c_mean, "transformer_mean": t_mean,
        "winner": winner, "difference_is": "transformer minus convnet, in the metric's units",
        "significant": None, "difference": t_mean - c_mean, "low": None, "high": None}
    mine = {b: sorted((r for r in results if r.evaluation == evaluation and r.backbone == b), key=lambda r: r.seed)
            for b in (convnet, transformer)}
    seeds = sorted({r.seed for r in mine[convnet]} & {r.seed for r in mine[transformer]})
    if not answer.can_recompute(kind, entry["metric"]):
        out["untested_reason"] = f"{entry['metric']} cannot be recomputed from per-image predictions ({kind})"
        return out
    if not seeds:
        out["untested_reason"] = "the two backbones share no seed"
        return out
    runs = {b: [r for r in rs if r.seed in seeds] for b, rs in mine.items()}
    component = entry.get("component")
    try:  # a run without its predictions, or runs on different test images: reported, not fatal
        t_tables = _tables(runs[transformer], predictions, component)
        c_tables = _tables(runs[convnet], predictions, component)
        statistic = answer.metric_statistic(kind, entry["metric"])
        boot = answer.paired_bootstrap(t_tables, c_tables, statistic, n_resamples=resamples, confidence=confidence,
                                       seed=seed)
    except answer.AnswerError as exc:
        out["untested_reason"] = str(exc)
        return out
    out.update({**{k: boot[k] for k in ("difference", "low", "high", "significant")}, "seeds": seeds,
                "bootstrap": boot, "run_ids": {b: [r.mlflow_run_id for r in rs] for b, rs in runs.items()}})
    if kind == "classification":
        out["mcnemar"] = answer.mcnemar_over_seeds(t_tables, c_tables, alpha=alpha)
    return out


def study_answer(table: Mapping[str, Any], results: Sequence[FinetuneResult], *, kinds: Mapping[str, str],
                 predictions: Callable[[str], pd.DataFrame], resamples: int, seed: int, confidence: float,
                 alpha: float) -> dict[str, Any]:
    """The answer as JSON-ready numbers and the verdict paragraph (``kinds``: evaluation -> its task kind)."""
    backbones = table["backbones"]
    families = {b: v["family"] for b, v in backbones.items()}
    comparisons = []
    for evaluation, entry in table["tasks"].items():
        found = compare_evaluation(evaluation, entry, families=families, kind=kinds[evaluation], results=results,
                                   predictions=predictions, resamples=resamples, seed=seed, confidence=confidence,
                                   alpha=alpha)
        if found is not None:
            comparisons.append(found)
    means = pd.DataFrame({e: {b: c["mean"] for b, c in entry["backbones"].items()}
                          for e, entry in table["tasks"].items()}).T.reindex(columns=list(backbones))
    means = means.astype(float)
    higher = {e: entry["higher_is_better"] for e, entry in table["tasks"].items()}
    zscores = answer.family_zscores(means, higher)
    correlations = answer.ranking_correlations(means, higher)
    imagenet = answer.imagenet_correlation({b: v.get("imagenet_top1") for b, v in backbones.items()},
                                           {b: v.get("average_rank") for b, v in backbones.items()})
    random_init = any(v["weights"] == "none" for v in backbones.values())
    family_ranks = {f: v["average_rank"] for f, v in table["families"].items()}
    family_z = {f: _mean([zscores[b] for b in backbones if families[b] == f]) for f in table["families"]}
    text = answer.verdict(comparisons, family_ranks=family_ranks, random_init=random_init,
                          zscores={b: _none(zscores[b]) for b in backbones}, families=families)
    return {"schema": SCHEMA, "study": table["study"], "random_init": random_init, "confidence": confidence,
            "bootstrap_resamples": resamples, "bootstrap_seed": seed, "alpha": alpha, "verdict": text,
            "comparisons": comparisons, "family_average_rank": family_ranks,
            "zscores": {b: _none(zscores[b]) for b in backbones}, "family_zscores": family_z,
            "ranking_correlations": {e: {o: _none(v) for o, v in row.items()}
                                     for e, row in correlations.to_dict(orient="index").items()},
            "imagenet_correlation": imagenet}


def _none(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _mean(values: Sequence[Any]) -> float | None:
    kept = [v for v in values if _none(v) is not None]
    return sum(kept) / len(kept) if kept else None
