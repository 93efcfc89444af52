"""A study backbone a task does not run on (``tasks.<task>.backbones`` lists others): the outputs its
``finetune`` / ``finetune_multitask`` stage leaves, written without importing the engine's training code, so that the
stage costs DVC a short process and not a fine-tune's start-up (torch, timm, MLflow, Ray Train).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transferbench.atomic import write_json
from transferbench.config import Settings
from transferbench.engine.run_files import records_dir


def write_skipped(settings: Settings, *, task: str, backbone: str, metrics_dir: str | Path | None,
                  plots_dir: str | Path) -> str:
    """The stage's metrics directory holds only ``skipped.json`` (``dvc metrics show`` lists it as skipped: 1), its
    record directory ``skipped.json`` saying why, its plots directory is empty: ``dvc repro`` records the stage as
    done, and the tables never read it. Returns the reason."""
    reason = (f"tasks.{task}.backbones does not list {backbone}; {task} runs on "
              f"{', '.join(settings.backbones_of(task))}")
    root = Path(metrics_dir or settings.compare.metrics_dir)
    metrics, record = root / task / backbone, records_dir(root) / task / backbone
    plots = Path(plots_dir) / task / backbone
    for directory in (metrics, record, plots):
        if directory.exists():
            shutil.rmtree(directory)
    plots.mkdir(parents=True)
    write_json(record / "skipped.json", {"task": task, "backbone": backbone, "skipped": True, "reason": reason})
    write_json(metrics / "skipped.json", {"skipped": 1})
    return reason
