"""Fixtures for evaluation tests (helpers live in study_files.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from study_files import write_metrics, write_params


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Write a study (params + metrics) under tmp_path, chdir there, and return the params path."""
    monkeypatch.chdir(tmp_path)

    def make(scores: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping[str, str] | None = None,
             **kwargs: Any) -> Path:
        metrics = metrics or {t: "accuracy" for t in scores}
        backbones = list(next(iter(scores.values())))
        seeds = range(len(next(iter(next(iter(scores.values())).values()))))
        write_metrics(tmp_path / "metrics", scores, metrics)
        return write_params(tmp_path, tasks=metrics, backbones=backbones, seeds=list(seeds), **kwargs)

    return make
