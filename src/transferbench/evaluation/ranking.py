"""Per-task ranks and family average ranks: the paper's way of reading the study.

Zhou et al. (2021) rank the backbones on every task by the task's metric and compare the
families by their average rank (PROTOCOL.md, "What the results look like"). Here:

- A backbone's score on a task is the mean of ``test_<metric>`` over seeds (the paper reports
  the mean of three runs); its spread is the sample standard deviation (ddof=1; ``None`` with
  one seed).
- Rank 1 is best. A lower-is-better metric (its task kind says so: e.g. age MAE) ranks the
  smallest mean first.
- Ties get the average of the ranks they span ("average" / fractional ranking, as in the
  Friedman test): two backbones tied for first both get 1.5. Means are rounded to
  ``RANK_DECIMALS`` before ranking so float summation order cannot break a real tie.
- A backbone's average rank is the mean of its per-task ranks. A family's per-task rank is the
  mean of its members' ranks on that task; its average rank is the mean of its members'
  average ranks (equal to the mean of its per-task ranks, every backbone being on every task).

The table is a plain JSON-ready dict (schema ``SCHEMA``): the same object is written to
``reports/rank_table.json``, committed as a drift baseline and read back by ``drift``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from transferbench.config import BackboneSettings
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.results import FinetuneResult
from transferbench.evaluation.significance import friedman_nemenyi
from transferbench.models.backbones import WeightsSource

SCHEMA = "transferbench.rank_table/1"
RANK_METHOD = "average"
RANK_DECIMALS = 12


def weights_label(weights: str) -> str:
    """An honest label for where a backbone's initial weights came from."""
    return WeightsSource.parse(weights).description


def rank_scores(means: Mapping[str, float], *, higher_better: bool) -> dict[str, float]:
    """Rank backbones on one task: 1 is best, ties share the average of their ranks."""
    series = pd.Series({k: round(v, RANK_DECIMALS) for k, v in means.items()}, dtype=float)
    ranks = series.rank(method=RANK_METHOD, ascending=not higher_better)
    return {k: float(ranks[k]) for k in means}


def _spread(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def rank_table(results: Sequence[FinetuneResult], *, study: str, task_metrics: Mapping[str, MetricSpec],
               backbones: Mapping[str, BackboneSettings], alpha: float = 0.05) -> dict[str, Any]:
    """Build the study's rank table from its per-seed results.

    ``task_metrics`` maps each task (in study order) to its ranking metric and direction; ``backbones``
    is the catalogue entry of each backbone in the study (in study order).
    """
    scores: dict[tuple[str, str], list[float]] = {}
    for r in sorted(results, key=lambda r: r.seed):
        scores.setdefault((r.task, r.backbone), []).append(r.test_score)
    families = sorted({b.family for b in backbones.values()})

    tasks: dict[str, Any] = {}
    for task, metric in task_metrics.items():
        missing = [b for b in backbones if (task, b) not in scores]
        if missing:
            raise ValueError(f"task {task!r}: no results for backbones {missing}")
        means = {b: statistics.fmean(scores[task, b]) for b in backbones}
        ranks = rank_scores(means, higher_better=metric.higher_is_better)
        tasks[task] = {
            "metric": metric.name,
            "higher_is_better": metric.higher_is_better,
            "backbones": {b: {"mean": means[b], "std": _spread(scores[task, b]), "n_seeds": len(scores[task, b]),
                              "rank": ranks[b]} for b in backbones},
            "family_rank": {f: statistics.fmean(ranks[b] for b, s in backbones.items() if s.family == f)
                            for f in families},
        }

    average = {b: statistics.fmean(tasks[t]["backbones"][b]["rank"] for t in tasks) for b in backbones}
    family_average = {f: statistics.fmean(average[b] for b, s in backbones.items() if s.family == f)
                      for f in families}
    rank_matrix = pd.DataFrame({b: [tasks[t]["backbones"][b]["rank"] for t in tasks] for b in backbones},
                               index=list(tasks))
    return {
        "schema": SCHEMA,
        "study": study,
        "ranking": {"statistic": "mean of test metric over seeds", "spread": "sample std over seeds (ddof=1)",
                    "rank": "1 = best; ties share the average rank", "method": RANK_METHOD},
        "tasks": tasks,
        "backbones": {b: {"model": s.model, "family": s.family, "weights": s.weights,
                          "weights_label": weights_label(s.weights), "imagenet_top1": s.imagenet_top1,
                          "average_rank": average[b]} for b, s in backbones.items()},
        "families": {f: {"average_rank": family_average[f],
                         "backbones": [b for b, s in backbones.items() if s.family == f]} for f in families},
        "family_order": family_order(family_average),
        "significance": friedman_nemenyi(rank_matrix, alpha=alpha),
    }


def family_order(family_average: Mapping[str, float]) -> list[list[str]]:
    """Families best first; families with equal average rank share a group."""
    groups: dict[float, list[str]] = {}
    for family, rank in sorted(family_average.items(), key=lambda kv: (round(kv[1], RANK_DECIMALS), kv[0])):
        groups.setdefault(round(rank, RANK_DECIMALS), []).append(family)
    return list(groups.values())
