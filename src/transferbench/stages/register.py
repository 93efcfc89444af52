"""Stage ``register``: each (task, backbone)'s best checkpoint in the MLflow Model Registry.

The best seed by validation metric (in its task kind's direction) becomes a version of the model
``<study>.<task>`` (``<study>.<task>.linear_probe`` for linear evaluation; retrieval registers
nothing; a multitask task is one model ``<study>.<multitask task>``, chosen by its own selection
metric, the summed val loss, not one per component); each task registers the backbones it ran.
Aliases ``champion`` and ``best-<family>`` follow the best val scores. Writes
``<data.reports_dir>/registry.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transferbench.atomic import write_text
from transferbench.config import Settings
from transferbench.engine.tracking import resolve_tracking_uri, store_lock
from transferbench.evaluation.registry import register_study
from transferbench.evaluation.study import registered_evaluations, study_results, task_metrics
from transferbench.provenance import git_commit


def run(settings: Settings, *, summary: str | Path | None = None) -> list[dict[str, Any]]:
    import mlflow
    from mlflow import MlflowClient

    # Set process-wide too: MLflow's registry store resolves logged models through the default
    # client, which would otherwise open a different (default) store.
    uri = resolve_tracking_uri(settings.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    specs = registered_evaluations(settings)
    results = study_results(settings, specs)
    # Two register processes on one SQLite store (`dvc queue start -j 2`) take turns: each finds the versions the
    # other made. A server store has no shared lock file: there the registry keeps the first of any duplicate.
    with store_lock(uri):
        rows = register_study(MlflowClient(tracking_uri=uri, registry_uri=uri), results,
                              metrics=task_metrics(settings, specs), study=settings.study.name,
                              git_commit=git_commit())
    write_text(Path(summary or Path(settings.data.reports_dir) / "registry.json"), json.dumps(rows, indent=2) + "\n")
    return rows
