"""Every on-disk path the pipeline reads or writes, in one place.

Paths are derived from ``params.yaml`` (``data`` section) and the working directory
the command runs in, never from ``__file__``, so an installed package works too.
"""

from __future__ import annotations

import os
from pathlib import Path

from transferbench.config import DataSettings

MIRROR_ENV = "TRANSFERBENCH_DATA_MIRROR"
SPLITS = ("train", "val", "test")


def mirror_root() -> Path | None:
    """The offline mirror directory named by $TRANSFERBENCH_DATA_MIRROR, if set."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None


def raw_dataset_dir(data: DataSettings, dataset: str) -> Path:
    return Path(data.raw_dir) / dataset


def split_dir(data: DataSettings, task: str) -> Path:
    return Path(data.splits_dir) / task


def manifest_path(data: DataSettings, task: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split_dir(data, task) / f"{split}.csv"


def reports_dir(data: DataSettings) -> Path:
    return Path(data.reports_dir)
