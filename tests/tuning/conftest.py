"""Fixtures for the sensitivity-study tests: the fine-tuning tests' toy task, plus a sensitivity section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.conftest import (  # noqa: F401  (fixtures reused from the fine-tuning tests)
    ray_cluster,
    toy_params,
    toy_settings,
    toy_splits,
)


def sensitivity_params(root: Path, data: Path, **sensitivity: Any) -> dict:
    """toy_params with stores under ``root`` (data from ``data``) and a small sensitivity study."""
    raw = toy_params(data, tracking={"tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
                                     "artifact_location": str(root / "mlartifacts"), "system_metrics": False,
                                     "log_model": False})
    raw["data"]["cache_dir"] = str(root / "cache")
    raw["sensitivity"] = {
        "tasks": ["toy"], "backbones": ["test_resnet", "test_vit"], "n_trials": 8, "max_epochs": 3,
        "sampler": "qmc", "seed": 0, "storage": f"sqlite:///{root / 'optuna.db'}",
        "pruner": {"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "heartbeat_interval": 2, "grace_period": 10, "reports_dir": str(root / "reports"),
        "metrics_dir": str(root / "sensitivity-metrics"),
        "space": {"lr": {"low": 1e-6, "high": 1e-1, "log": True}, "warmup_iters": {"low": 0, "high": 12},
                  "warmup_lr": {"low": 1e-8, "high": 1e-4, "log": True}},
        **sensitivity,
    }
    return raw


@pytest.fixture()
def study_root(tmp_path: Path) -> Path:
    return tmp_path
