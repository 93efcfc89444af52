"""Where a task's split manifests live: ``<data.splits_dir>/<task>/{train,val,test}.csv``."""

from __future__ import annotations

from pathlib import Path

from transferbench.config import DataSettings
from transferbench.paths import SPLITS


def split_dir(data: DataSettings, task: str) -> Path:
    return Path(data.splits_dir) / task


def manifest_path(data: DataSettings, task: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split_dir(data, task) / f"{split}.csv"
