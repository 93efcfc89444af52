"""The multi-task table (PROTOCOL.md, "Multi-task"; Zhou et al. 2021, Tables 9-13).

One backbone trained on several tasks at once (a multitask task and its components) is read per
component, as the paper does: its performance, its relative change over single-task training, and
its rank.

- Performance: the mean ± std over seeds of the component's test metric (its selection metric);
  the rank is the rank table's for the column ``<multitask>/<component>``.
- Relative change, per seed, against the single-task result of the SAME (component task, backbone,
  seed) in mode full, read from the study's results (never rerun): ``100 * (multi - single) /
  |single|`` for a higher-is-better metric and ``100 * (single - multi) / |single|`` for a lower-is-
  better one, so that POSITIVE MEANS THE MULTI-TASK MODEL IS BETTER. Then mean ± std over seeds, and
  per family over its backbones' per-seed values. A seed without its single-task result is left out
  and counted (``unpaired_seeds``); a single-task score of 0 leaves the change undefined (null,
  with a note). Neither is ever dropped silently.
- Routing accuracy (a mixed-dataset multitask model whose router sends each image to a head): the
  share of test images routed to the right head, mean ± std over seeds per backbone.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from transferbench.config import BackboneSettings
from transferbench.evaluation.results import FinetuneResult

RELATIVE_CHANGE = ("100 * (multi - single) / |single| per seed, paired by seed with the single-task run of the same "
                   "(component task, backbone, seed) in mode full; for a lower-is-better metric (single - multi); "
                   "positive: the multi-task model is better")


def relative_change(multi: float, single: float, *, higher_is_better: bool) -> float | None:
    """Relative change (%) of a multi-task score over its single-task score, positive when multi-task is better;
    None when the single-task score is 0 (undefined)."""
    if single == 0:
        return None
    better = multi - single if higher_is_better else single - multi
    return 100.0 * better / abs(single)


def _summary(values: Sequence[float], count: str = "n_seeds") -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            count: len(values)}


def _seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def multi_task_table(results: Sequence[FinetuneResult], tasks: Mapping[str, Any],
                     backbones: Mapping[str, BackboneSettings]) -> dict[str, Any]:
    """Per multitask task, per component (the rank table's ``tasks`` entries with a ``component``), per backbone."""
    single = {(r.task, r.backbone, r.seed): r.test_score for r in results if r.component is None and r.mode == "full"}
    multi: dict[tuple[str, str], dict[int, FinetuneResult]] = {}
    for r in results:
        if r.component is not None:
            multi.setdefault((r.evaluation, r.backbone), {})[r.seed] = r

    out: dict[str, Any] = {}
    for evaluation, t in tasks.items():
        component = t.get("component")
        if component is None:
            continue
        entry = out.setdefault(t["task"], {"components": {}, "routing_accuracy": None})
        higher = t["higher_is_better"]
        cells: dict[str, Any] = {}
        family_changes: dict[str, list[float]] = {}
        for backbone, cell in t["backbones"].items():
            runs = multi[evaluation, backbone]
            changes, pairs, unpaired, undefined = [], [], [], []
            for seed, run in sorted(runs.items()):
                if (component, backbone, seed) not in single:
                    unpaired.append(seed)
                    continue
                base = single[component, backbone, seed]
                pairs.append(base)
                change = relative_change(run.test_score, base, higher_is_better=higher)
                if change is None:
                    undefined.append(seed)
                else:
                    changes.append(change)
            notes = []
            if unpaired:
                notes.append(f"no single-task {component} result of {backbone} for seed(s) {_seeds_text(unpaired)}: "
                             "left out of the relative change")
            if undefined:
                notes.append(f"single-task score 0 on seed(s) {_seeds_text(undefined)}: relative change "
                             "undefined there")
            cells[backbone] = {
                "performance": {"mean": cell["mean"], "std": cell["std"], "n_seeds": cell["n_seeds"]},
                "rank": cell["rank"],
                "single_task": _summary(pairs) if pairs else None,
                "relative_change": _summary(changes) if changes else None,
                "unpaired_seeds": len(unpaired),
                "note": "; ".join(notes) or None,
            }
            family_changes.setdefault(backbones[backbone].family, []).extend(changes)
        entry["components"][component] = {
            "evaluation": evaluation, "metric": t["metric"], "higher_is_better": higher,
            "relative_change": RELATIVE_CHANGE, "backbones": cells,
            "families": {f: _summary(v, "n") for f, v in sorted(family_changes.items()) if v},
        }
    for task, entry in out.items():
        routing: dict[str, dict[int, float]] = {}
        for (evaluation, backbone), runs in multi.items():
            for seed, run in runs.items():
                value = run.raw.get("test_routing_accuracy")
                if run.task == task and isinstance(value, (int, float)) and not isinstance(value, bool):
                    routing.setdefault(backbone, {})[seed] = float(value)
        if routing:
            entry["routing_accuracy"] = {b: _summary([v for _, v in sorted(routing[b].items())])
                                         for b in backbones if b in routing}
    return out
