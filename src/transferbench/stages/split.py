"""Stage ``split@<task>``: the task's train/val/test manifests, summary and quarantine (``data/splits/<task>``)."""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.data.splits import split_task


def run(settings: Settings, task: str) -> str:
    summary = split_task(task, settings.task(task), settings.data)
    return (f"{task}: rows {summary['rows']}, groups {summary['groups']}, "
            f"excluded {summary['excluded_total']} {summary['excluded']}")
