"""Stage ``compare``: the paper's rank tables, and (``--baseline``) the drift gate.

Per evaluation (a task in one mode, or a multi-task model's component) each backbone that ran it:
mean ± std over seeds and its rank; per-family average ranks, the paper's task groups, the gain from
full fine-tuning, the multi-task table and the Friedman/Nemenyi analysis ->
``<data.reports_dir>/rank_table.{md,csv,json}`` and figures, and the numbers ``dvc metrics`` shows
(``compare.ranks_file``: average ranks, Friedman p). With a baseline, the new
table is compared with it and the learning floors are checked (``evaluation.drift``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transferbench.atomic import write_json
from transferbench.config import Settings
from transferbench.evaluation import drift
from transferbench.evaluation.ranking import rank_table
from transferbench.evaluation.reports import rank_metrics, write_rank_reports
from transferbench.evaluation.study import evaluation_group, evaluations, study_results, task_metrics


@dataclass(frozen=True)
class Comparison:
    paths: dict[str, Path]
    drift_report: str | None = None  # Markdown, when a baseline was given
    drift: bool = False


def run(settings: Settings, *, baseline: str | Path | None = None) -> Comparison:
    """Write the rank reports; with ``baseline`` (a rank-table JSON) also gate them against it."""
    previous = drift.load_rank_table(baseline) if baseline is not None else None  # a bad baseline fails first
    study = settings.study
    specs = evaluations(settings)
    table = rank_table(study_results(settings, specs), study=study.name, task_metrics=task_metrics(settings, specs),
                       backbones={b: settings.backbone(b) for b in study.backbones}, alpha=settings.compare.alpha,
                       groups={e: evaluation_group(settings, spec) for e, spec in specs.items()},
                       evaluation_backbones={e: spec.backbones for e, spec in specs.items()})
    paths = write_rank_reports(table, Path(settings.data.reports_dir))
    paths["metrics"] = Path(settings.compare.ranks_file)
    write_json(paths["metrics"], rank_metrics(table))
    if previous is None:
        return Comparison(paths)
    tolerance = settings.compare.metric_tolerance
    changes = drift.compare_rank_tables(previous, table, tolerance=tolerance)
    changes += drift.check_learning_floors(table, settings.compare.learning_floors)
    return Comparison(paths, drift.drift_markdown(changes, baseline=str(baseline), tolerance=tolerance),
                      drift.has_drift(changes))
