"""Stage ``sensitivity@<task>-<backbone>``: an Optuna study of lr and warm-up for one (task, backbone).

Trials are in-process fine-tunes through the engine (``tuning.study``), tracked in MLflow; the study
lives in ``sensitivity.storage`` and continues when the stage is rerun. Its summary goes to
``<sensitivity.reports_dir>/<task>/studies/<backbone>.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferbench.config import Settings
from transferbench.tuning.report import study_json_path, summarise_study
from transferbench.tuning.study import prepare_study, run_workers, work


def run(settings: Settings, *, task: str, backbone: str, workers: int = 1, params_path: str | Path = "params.yaml",
        worker_only: bool = False) -> dict[str, Any] | None:
    """Run the study's trials (``workers`` Optuna workers) and summarise it; ``worker_only``: trials only."""
    handle = prepare_study(settings, task=task, backbone=backbone)
    if worker_only:
        work(settings, handle, task=task, backbone=backbone)
        return None
    run_workers(settings, handle, task=task, backbone=backbone, workers=workers, params_path=params_path)
    summary = summarise_study(settings, handle, task=task, backbone=backbone)
    summary["file"] = str(study_json_path(settings, task, backbone))
    return summary
