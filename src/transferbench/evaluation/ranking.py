"""Per-evaluation ranks and family average ranks: the paper's way of reading the study.

An evaluation is a task in one mode (``results.evaluation_id``: ``cub200``, ``cub200:linear_probe``,
``oxford5k``) or one component of a multi-task model (``nyu_multi/nyu_seg``); the table's ``tasks``
are keyed by it and carry ``task``, ``mode``, ``component`` (None but for a multi-task column) and
``group``.

Zhou et al. (2021) rank the backbones on every task by the task's metric and compare the
families by their average rank (PROTOCOL.md, "What the results look like"). Here:

- A backbone's score on a task is the mean of ``test_<metric>`` over seeds (the paper reports
  the mean of three runs); its spread is the sample standard deviation (ddof=1; ``None`` with
  one seed). Retrieval is deterministic: n = 1, said so (``n_note``).
- Rank 1 is best. A lower-is-better metric (its task kind says so: e.g. age MAE) ranks the
  smallest mean first.
- Ties get the average of the ranks they span ("average" / fractional ranking, as in the
  Friedman test): two backbones tied for first both get 1.5. Means are rounded to
  ``RANK_DECIMALS`` before ranking so float summation order cannot break a real tie.
- An evaluation may run on a subset of the study's backbones (``tasks.<task>.backbones``): it ranks
  the backbones it ran (1..k), and only those have a cell. A backbone's average rank is the mean of
  its ranks over the evaluations it ran. A family's per-task rank is the mean of its members' ranks
  on that task (over the members that ran it); its average rank is the mean of its members' average
  ranks (equal to the mean of its per-task ranks when every backbone ran every evaluation).
- Friedman/Nemenyi needs a complete matrix: it runs over the evaluations that ran every study
  backbone and lists the others as left out; its CD diagram uses the average ranks over those.

- Groups (the paper's tables: fine-grained, scene, open-domain, in-domain, face, linear evaluation,
  retrieval, multi-task): per-backbone average rank over the group's evaluations it ran and
  per-family average ranks.
- Gain from full fine-tuning (paper Table 7): on every task run in both modes, per backbone the
  per-seed difference full - linear probe (in the metric's better direction), mean ± std over
  seeds; per family the mean ± std over its backbones' per-seed gains.
- Multi-task (paper Tables 9-13): per multi-task model and component, performance, relative change
  over single-task training and rank (``multitask.multi_task_table``).

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
from transferbench.evaluation.multitask import multi_task_table
from transferbench.evaluation.results import FinetuneResult, evaluation_id
from transferbench.evaluation.significance import friedman_nemenyi
from transferbench.models.backbones import WeightsSource

# 2: evaluations (task x mode), groups, gain table; 3: evaluations on a subset of the backbones, multi-task
# component columns and the multi_task section, significance over the complete evaluations.
SCHEMA = "transferbench.rank_table/3"
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


def _mean(values: Sequence[float]) -> float | None:
    """The mean, or None for nothing to average (a backbone that ran none of the evaluations)."""
    return statistics.fmean(values) if values else None


Averages = dict[str, float | None]


def _average_ranks(tasks: Mapping[str, Any], evaluations: Sequence[str],
                   backbones: Mapping[str, BackboneSettings]) -> tuple[Averages, Averages]:
    """Each backbone's mean rank over those of ``evaluations`` it ran, and each family's mean of its members'."""
    average = {b: _mean([tasks[e]["backbones"][b]["rank"] for e in evaluations if b in tasks[e]["backbones"]])
               for b in backbones}
    families = sorted({s.family for s in backbones.values()})
    family = {f: _mean([average[b] for b, s in backbones.items() if s.family == f and average[b] is not None])
              for f in families}
    return average, family


def rank_table(results: Sequence[FinetuneResult], *, study: str, task_metrics: Mapping[str, MetricSpec],
               backbones: Mapping[str, BackboneSettings], alpha: float = 0.05,
               groups: Mapping[str, str] | None = None,
               evaluation_backbones: Mapping[str, Sequence[str] | None] | None = None) -> dict[str, Any]:
    """Build the study's rank table from its per-seed results.

    ``task_metrics`` maps each evaluation (in study order) to its ranking metric and direction;
    ``backbones`` is the catalogue entry of each backbone in the study (in study order); ``groups`` maps
    an evaluation to its paper group (default: "ungrouped"); ``evaluation_backbones`` maps an evaluation
    to the backbones it ran (``Settings.backbones_of``; absent or None: all of ``backbones``).
    """
    scores: dict[tuple[str, str], list[float]] = {}
    baselines: dict[str, list[float]] = {}
    baseline_kinds: dict[str, str] = {}
    identity: dict[str, tuple[str, str, str | None]] = {}
    for r in sorted(results, key=lambda r: r.seed):
        scores.setdefault((r.evaluation, r.backbone), []).append(r.test_score)
        identity[r.evaluation] = (r.task, r.mode, r.component)
        if r.trivial_baseline is not None:
            baseline_kinds[r.evaluation], score = r.trivial_baseline
            baselines.setdefault(r.evaluation, []).append(score)
    families = sorted({b.family for b in backbones.values()})
    groups = groups or {}
    evaluation_backbones = evaluation_backbones or {}

    tasks: dict[str, Any] = {}
    for task, metric in task_metrics.items():
        declared = evaluation_backbones.get(task)
        unknown = [b for b in declared or () if b not in backbones]
        ran = [b for b in backbones if declared is None or b in declared]
        if unknown or not ran:
            raise ValueError(f"task {task!r}: runs on {list(declared or ())}, not on a set of the study's backbones "
                             f"{list(backbones)}")
        missing = [b for b in ran if (task, b) not in scores]
        if missing:
            raise ValueError(f"task {task!r}: no results for backbones {missing}")
        means = {b: statistics.fmean(scores[task, b]) for b in ran}
        ranks = rank_scores(means, higher_better=metric.higher_is_better)
        task_name, mode, component = identity.get(task, (task, "full", None))
        tasks[task] = {
            "task": task_name,
            "mode": mode,
            "component": component,
            "group": groups.get(task, "ungrouped"),
            "metric": metric.name,
            "higher_is_better": metric.higher_is_better,
            "all_backbones": len(ran) == len(backbones),
            "n_note": "deterministic (no training, no seeds): n = 1" if mode == "frozen" else None,
            "trivial_baseline": statistics.fmean(baselines[task]) if task in baselines else None,
            "trivial_baseline_is": baseline_kinds.get(task),
            "backbones": {b: {"mean": means[b], "std": _spread(scores[task, b]), "n_seeds": len(scores[task, b]),
                              "rank": ranks[b]} for b in ran},
            "family_rank": {f: statistics.fmean(ranks[b] for b in ran if backbones[b].family == f)
                            for f in families if any(backbones[b].family == f for b in ran)},
        }

    average, family_average = _average_ranks(tasks, list(tasks), backbones)
    return {
        "schema": SCHEMA,
        "study": study,
        "ranking": {"statistic": "mean of test metric over seeds", "spread": "sample std over seeds (ddof=1)",
                    "rank": "1 = best; ties share the average rank", "method": RANK_METHOD,
                    "subsets": "an evaluation on a subset of the backbones ranks those it ran (1..k); a backbone's "
                               "average rank (overall and per group) is over the evaluations it ran, a family's the "
                               "mean of its backbones' average ranks; Friedman/Nemenyi uses only the evaluations "
                               "that ran every backbone (significance.evaluations)"},
        "tasks": tasks,
        "backbones": {b: {"model": s.model, "family": s.family, "weights": s.weights,
                          "weights_label": weights_label(s.weights), "imagenet_top1": s.imagenet_top1,
                          "average_rank": average[b]} for b, s in backbones.items()},
        "families": {f: {"average_rank": family_average[f],
                         "backbones": [b for b, s in backbones.items() if s.family == f]} for f in families},
        "family_order": family_order({f: r for f, r in family_average.items() if r is not None}),
        "groups": group_ranks(tasks, backbones),
        "gain_from_full_finetuning": full_finetuning_gain(results, task_metrics, backbones),
        "multi_task": multi_task_table(results, tasks, backbones),
        "significance": friedman_over_complete(tasks, backbones, alpha=alpha),
    }


def friedman_over_complete(tasks: Mapping[str, Any], backbones: Mapping[str, BackboneSettings], *,
                           alpha: float) -> dict[str, Any]:
    """Friedman/Nemenyi over the evaluations that ran every backbone (the test needs a complete rank matrix).

    Adds ``evaluations`` (those tested), ``left_out`` (the others: evaluation -> why) and ``average_ranks``
    (each backbone's mean rank over the tested evaluations: what the CD diagram draws).
    """
    complete = [e for e, t in tasks.items() if t["all_backbones"]]
    matrix = pd.DataFrame({b: [tasks[e]["backbones"][b]["rank"] for e in complete] for b in backbones},
                          index=complete, dtype=float)
    average, _ = _average_ranks(tasks, complete, backbones)
    left_out = {e: f"ran {len(t['backbones'])} of the study's {len(backbones)} backbones"
                for e, t in tasks.items() if not t["all_backbones"]}
    return {**friedman_nemenyi(matrix, alpha=alpha), "evaluations": complete, "left_out": left_out,
            "average_ranks": average}


def group_ranks(tasks: Mapping[str, Any], backbones: Mapping[str, BackboneSettings]) -> dict[str, Any]:
    """Per paper group (in first-appearance order): its evaluations, each backbone's and family's average rank
    (over the group's evaluations the backbone ran; None when it ran none of them)."""
    out: dict[str, Any] = {}
    for group in dict.fromkeys(t["group"] for t in tasks.values()):
        members = [e for e, t in tasks.items() if t["group"] == group]
        average, family = _average_ranks(tasks, members, backbones)
        out[group] = {"evaluations": members, "backbones": average, "families": family}
    return out


def full_finetuning_gain(results: Sequence[FinetuneResult], task_metrics: Mapping[str, MetricSpec],
                         backbones: Mapping[str, BackboneSettings]) -> dict[str, Any]:
    """Per task run in both modes: full - linear_probe test metric (better direction positive), paired by seed."""
    full = {(r.task, r.backbone, r.seed): r.test_score for r in results if r.mode == "full" and r.component is None}
    probes = sorted((r for r in results if r.mode == "linear_probe"), key=lambda r: (r.backbone, r.seed))
    out: dict[str, Any] = {}
    for evaluation, metric in task_metrics.items():
        runs = [r for r in probes if r.evaluation == evaluation]
        if not runs or evaluation_id(runs[0].task, "full") not in task_metrics:
            continue
        sign = 1.0 if metric.higher_is_better else -1.0
        gains: dict[str, list[float]] = {}
        for r in runs:
            if r.backbone in backbones and (r.task, r.backbone, r.seed) in full:
                gains.setdefault(r.backbone, []).append(sign * (full[r.task, r.backbone, r.seed] - r.test_score))
        if not gains:
            continue
        family_gains: dict[str, list[float]] = {}
        for b, values in gains.items():
            family_gains.setdefault(backbones[b].family, []).extend(values)
        out[runs[0].task] = {
            "metric": metric.name, "higher_is_better": metric.higher_is_better,
            "gain": "full fine-tuning minus linear probe, per seed (positive: full is better)",
            "backbones": {b: {"mean": statistics.fmean(v), "std": _spread(v), "n_seeds": len(v)}
                          for b, v in gains.items()},
            "families": {f: {"mean": statistics.fmean(v), "std": _spread(v), "n": len(v)}
                         for f, v in sorted(family_gains.items())},
        }
    return out


def family_order(family_average: Mapping[str, float]) -> list[list[str]]:
    """Families best first; families with equal average rank share a group."""
    groups: dict[float, list[str]] = {}
    for family, rank in sorted(family_average.items(), key=lambda kv: (round(kv[1], RANK_DECIMALS), kv[0])):
        groups.setdefault(round(rank, RANK_DECIMALS), []).append(family)
    return list(groups.values())
