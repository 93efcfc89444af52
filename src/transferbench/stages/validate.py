"""Stage ``validate@<task>``: great-expectations suites on the task's raw data and splits (``reports/validation``)."""

from __future__ import annotations

from transferbench.config import Settings
from transferbench.data.validation import validate_task


def run(settings: Settings, task: str) -> str:
    report = validate_task(task, settings.task(task), settings.data)
    return f"{task}: validation passed ({report['checked']} expectations, {len(report['warnings'])} warnings)"
