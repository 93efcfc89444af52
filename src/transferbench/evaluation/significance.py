"""Are the backbones' rank differences across tasks significant? Friedman + Nemenyi (Demšar 2006).

The paper reports average ranks without a test; with few tasks those averages can be noise.
The Friedman test treats tasks as blocks and backbones as treatments; where it applies, the
Nemenyi post-hoc test gives pairwise p-values and the critical difference (CD): two backbones
whose average ranks differ by less than CD are not significantly different at ``alpha``.

CD = q_alpha * sqrt(k (k + 1) / (6 N)), with k backbones, N tasks and q_alpha the studentized
range quantile over sqrt(2) (Demšar 2006, Table 5a). The test needs at least three tasks and
three backbones, and a complete matrix (every backbone ranked on every task: ``ranking`` passes
only such tasks); below that the result says so plainly instead of reporting a number.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import scikit_posthocs as sp
from scipy import stats

MIN_TASKS = 3
MIN_BACKBONES = 3


def critical_difference(n_backbones: int, n_tasks: int, alpha: float) -> float:
    """Nemenyi critical difference of average ranks (Demšar 2006)."""
    q_alpha = stats.studentized_range.ppf(1 - alpha, n_backbones, math.inf) / math.sqrt(2)
    return float(q_alpha * math.sqrt(n_backbones * (n_backbones + 1) / (6 * n_tasks)))


def friedman_nemenyi(ranks: pd.DataFrame, *, alpha: float = 0.05) -> dict[str, Any]:
    """Friedman test over a tasks x backbones rank matrix, with Nemenyi post-hoc where it applies."""
    n_tasks, n_backbones = ranks.shape
    base = {"test": "friedman", "posthoc": "nemenyi", "alpha": alpha,
            "n_tasks": n_tasks, "n_backbones": n_backbones}
    if n_tasks < MIN_TASKS or n_backbones < MIN_BACKBONES:
        return {**base, "applies": False,
                "reason": (f"the Friedman test needs at least {MIN_TASKS} tasks and {MIN_BACKBONES} backbones; "
                           f"there are {n_tasks} task(s) that rank every backbone and {n_backbones} backbone(s), so "
                           f"the ranks are descriptive only and no difference can be called significant")}
    if (ranks.nunique(axis=1) == 1).all():
        return {**base, "applies": False,
                "reason": "every backbone ties on every task; there is nothing to test"}
    statistic, p_value = stats.friedmanchisquare(*(ranks[c].to_numpy() for c in ranks.columns))
    pairwise = sp.posthoc_nemenyi_friedman(ranks.to_numpy())
    pairwise.index = pairwise.columns = list(ranks.columns)
    return {**base, "applies": True,
            "statistic": float(statistic), "p_value": float(p_value),
            "significant": bool(p_value < alpha),
            "critical_difference": critical_difference(n_backbones, n_tasks, alpha),
            "pairwise_p": {a: {b: float(pairwise.loc[a, b]) for b in ranks.columns if b != a}
                           for a in ranks.columns}}
