"""Fixtures for every test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_tracking_uri(monkeypatch: pytest.MonkeyPatch):
    """mlflow.set_tracking_uri / set_registry_uri also set $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI:
    keep each test on its own store, and a developer's own MLflow settings out of the tests."""
    import mlflow

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    yield
    mlflow.set_tracking_uri(None)  # unset, back to the defaults ("" would mean a file store at the cwd)
    mlflow.set_registry_uri(None)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
