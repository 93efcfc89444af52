"""Fixtures for the scale-out tests (issue #7): real PostgreSQL, MLflow server and Ray nodes on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transferbench.engine.cluster import RayCluster

from .services import MlflowServer, Postgres, postgres_bindir


@pytest.fixture(scope="session")
def postgres():
    if postgres_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(postgres, tmp_path: Path, request: pytest.FixtureRequest):
    """A fresh ``mlflow server`` on its own PostgreSQL database, serving artifacts from tmp_path."""
    database = postgres.create_database(f"mlflow_{request.node.name[:40].lower().replace('[', '_').strip(']')}")
    server = MlflowServer(database, tmp_path / "server-artifacts", tmp_path / "mlflow-server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory: pytest.TempPathFactory):
    """A head node and a second node, one CPU each (two machines' worth of workers, one at a time each)."""
    cluster = RayCluster(tmp_path_factory.mktemp("ray-logs"), fast_failure_detection=True)
    try:
        cluster.start([1, 1])
        yield cluster
    finally:
        cluster.stop()
