"""Stage ``sensitivity_report@<task>``: one task's studies together: importances, curves, rank stability.

Writes ``<sensitivity.reports_dir>/<task>/`` (``summary.json``, ``best_params.json`` and the
figures) and logs them to the study's ``sensitivity`` MLflow run; prints the ``dvc exp run``
command that feeds the best values back into the main study.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transferbench.config import Settings
from transferbench.tuning.report import task_report


def run(settings: Settings, *, task: str, backbones: Sequence[str] | None = None) -> dict[str, Any]:
    return task_report(settings, task=task, backbones=backbones)
