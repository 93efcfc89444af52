"""A study backbone a task does not run on (``tasks.<task>.backbones`` lists others): the outputs its
``finetune`` / ``finetune_multitask`` stage leaves, written without importing the engine, so that the
stage costs DVC a short process and not a fine-tune's start-up (torch, timm, MLflow, Ray Train).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transferbench.atomic import write_json
from transferbench.config import Settings


def write_skipped(settings: Settings, *, task: str, backbone: str, metrics_dir: str | Path | None,
                  plots_dir: str | Path) -> str:
    """The stage's metrics directory holds only ``skipped.json`` saying why (``dvc metrics show`` lists it), its plots
    directory is empty: ``dvc repro`` records the stage as done, and the tables never read it. Returns the reason."""
    reason = (f"tasks.{task}.backbones does not list {backbone}; {task} runs on "
              f"{', '.join(settings.backbones_of(task))}")
    metrics, plots = Path(metrics_dir or settings.compare.metrics_dir) / task / backbone, Path(plots_dir) / task / backbone
    for directory in (metrics, plots):
        if directory.exists():
            shutil.rmtree(directory)
    plots.mkdir(parents=True)
    write_json(metrics / "skipped.json", {"skipped": True, "reason": reason})
    return reason
