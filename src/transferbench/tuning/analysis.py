"""What a sensitivity study says: importances, spread, rank stability, best configuration.

Pure functions on trial records (plain dicts, as written to ``studies/<backbone>.json``), so the
report stage needs no Optuna storage. Conventions, stated once:

- A trial's **score** is the task's val metric at its best epoch (lowest val loss). Pruned
  trials count with the score they had when stopped: they are real points of the sampled
  space, and being stopped early is part of what a bad configuration costs. Failed trials
  (and surplus trials of parallel workers) are left out.
- **Importances** (fANOVA and PED-ANOVA, Optuna's evaluators) are computed over every complete
  or pruned trial, normalised to sum to 1. When an evaluator sees no effect at all (e.g. every
  score equal) it has nothing to apportion; Optuna then shares equally and ``degenerate`` says so.
  A family's importances are the mean of its members', renormalised.
- **Spread**: best, median and worst decile (the 10 % quantile on the bad side) of the scores.
- **Rank stability**: for each ``config_index`` i that every backbone has, the backbones are
  ranked by score (``evaluation.ranking.rank_scores``, ties averaged), each family's rank is the
  mean of its members', and the family order is compared with the order at i = 0, the fixed
  protocol choice. Reported: the fraction of i >= 1 whose family order differs, and per backbone
  how often its rank differs from its rank at i = 0.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from transferbench.config import TUNED_PARAMETERS
from transferbench.evaluation.ranking import family_order, rank_scores

EVALUATORS = ("fanova", "ped_anova")
SCORED_STATES = ("COMPLETE", "PRUNED")


def scored(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Complete and pruned trials that have a score, in config_index order."""
    keep = [r for r in records if r["state"] in SCORED_STATES and r.get("score") is not None]
    return sorted(keep, key=lambda r: (r["config_index"], r["number"]))


def _distributions(space: Mapping[str, Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The search space as Optuna distributions, widened to any value a trial used (the fixed choice)."""
    from optuna.distributions import FloatDistribution, IntDistribution

    out = {}
    for name in TUNED_PARAMETERS:
        values = [r["params"][name] for r in records]
        low, high = min([space[name]["low"], *values]), max([space[name]["high"], *values])
        if name == "warmup_iters":
            out[name] = IntDistribution(int(low), int(high))
        else:
            out[name] = FloatDistribution(low, high, log=bool(space[name].get("log")))
    return out


def importances(records: Sequence[Mapping[str, Any]], *, space: Mapping[str, Mapping[str, Any]],
                higher_better: bool, seed: int, ped_anova_quantile: float) -> dict[str, Any]:
    """fANOVA and PED-ANOVA importances of lr, warmup_iters and warmup_lr (each sums to 1)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    points = scored(records)
    distributions = _distributions(space, points)
    study = optuna.create_study(direction="maximize" if higher_better else "minimize")
    study.add_trials([optuna.trial.create_trial(params={k: r["params"][k] for k in TUNED_PARAMETERS},
                                                distributions=distributions, value=float(r["score"]))
                      for r in points])
    evaluators = {"fanova": FanovaImportanceEvaluator(seed=seed),
                  "ped_anova": PedAnovaImportanceEvaluator(target_quantile=ped_anova_quantile)}
    out: dict[str, Any] = {"n_trials": len(points), "degenerate": {}}
    constant = len({float(r["score"]) for r in points}) <= 1  # nothing to explain: fANOVA has no variance
    for name, evaluator in evaluators.items():
        raw = evaluator.evaluate(study, params=list(TUNED_PARAMETERS)) if len(points) > 1 and not constant else {}
        total = sum(raw.values())
        out["degenerate"][name] = not total > 0
        out[name] = ({k: raw[k] / total for k in TUNED_PARAMETERS} if total > 0 else {k: 1.0 / len(TUNED_PARAMETERS) for k in TUNED_PARAMETERS})
    return out


def family_importances(per_backbone: Mapping[str, Mapping[str, Any]],
                       families: Mapping[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """family -> evaluator -> param -> mean of the members' importances, renormalised to sum to 1."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for family in sorted(set(families.values())):
        members = [b for b, f in families.items() if f == family and b in per_backbone]
        out[family] = {}
        for evaluator in EVALUATORS:
            mean = {p: statistics.fmean(per_backbone[b][evaluator][p] for b in members) for p in TUNED_PARAMETERS}
            total = sum(mean.values())
            out[family][evaluator] = {p: v / total for p, v in mean.items()}
    return out


def spread(records: Sequence[Mapping[str, Any]], *, higher_better: bool) -> dict[str, Any]:
    """Best, median and worst decile of the scores over the sampled space."""
    scores = np.array([r["score"] for r in scored(records)], dtype=float)
    if scores.size == 0:
        return {"n": 0, "best": None, "median": None, "worst_decile": None, "worst": None}
    best, worst = (scores.max(), scores.min()) if higher_better else (scores.min(), scores.max())
    decile = np.quantile(scores, 0.1 if higher_better else 0.9)
    return {"n": int(scores.size), "best": float(best), "median": float(np.median(scores)),
            "worst_decile": float(decile), "worst": float(worst)}


def fixed_score(records: Sequence[Mapping[str, Any]]) -> float | None:
    return next((r["score"] for r in scored(records) if r["config_index"] == 0), None)


def best_trial(records: Sequence[Mapping[str, Any]], *, higher_better: bool) -> Mapping[str, Any] | None:
    """The best complete trial; ties go to the lower config_index (the fixed choice first)."""
    complete = [r for r in scored(records) if r["state"] == "COMPLETE"]
    if not complete:
        return None
    sign = -1.0 if higher_better else 1.0
    return min(complete, key=lambda r: (sign * r["score"], r["config_index"]))


def rank_stability(per_backbone: Mapping[str, Sequence[Mapping[str, Any]]], families: Mapping[str, str],
                   *, higher_better: bool) -> dict[str, Any]:
    """How often the family order on the task differs from the order under the fixed choice."""
    scores = {b: {r["config_index"]: float(r["score"]) for r in scored(records)}
              for b, records in per_backbone.items()}
    common = sorted(set.intersection(*(set(s) for s in scores.values()))) if scores else []
    rows = []
    for index in common:
        ranks = rank_scores({b: scores[b][index] for b in scores}, higher_better=higher_better)
        family_rank = {f: statistics.fmean(ranks[b] for b in scores if families[b] == f)
                       for f in sorted(set(families[b] for b in scores))}
        rows.append({"config_index": index, "ranks": ranks, "family_rank": family_rank,
                     "family_order": family_order(family_rank)})
    if not rows or rows[0]["config_index"] != 0:
        return {"n_configs": len(rows), "reference": None, "flip_fraction": None, "rank_flips": None,
                "configs": rows, "note": "the fixed protocol choice (config_index 0) is missing for some backbone"}
    reference, others = rows[0], rows[1:]
    flips = [r["config_index"] for r in others if r["family_order"] != reference["family_order"]]
    return {
        "n_configs": len(rows),
        "reference": {"config_index": 0, "label": "fixed protocol choice",
                      "family_order": reference["family_order"], "ranks": reference["ranks"]},
        "flip_fraction": (len(flips) / len(others)) if others else None,
        "flipped_configs": flips,
        "rank_flips": {b: sum(r["ranks"][b] != reference["ranks"][b] for r in others) for b in scores},
        "configs": rows,
    }
