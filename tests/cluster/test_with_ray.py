"""``transferbench with-ray -- CMD``: one real Ray head node for the command's lifetime, then gone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

PROBE = ("import json, os, ray; ray.init(logging_level='ERROR'); "
         "print(json.dumps({'address': os.environ['RAY_ADDRESS'], 'nodes': len(ray.nodes()), "
         "'cpus': ray.cluster_resources().get('CPU')}))")


def _with_ray(tmp_path: Path, *cmd: str, env: dict | None = None, logs: str = "logs") -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "transferbench.cli", "--params", str(REPO / "params.yaml"),
                           "with-ray", "--cpus", "2", "--log-dir", str(tmp_path / logs), "--", *cmd],
                          cwd=tmp_path, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_the_command_joins_a_head_node_that_is_stopped_afterwards(tmp_path: Path) -> None:
    done = _with_ray(tmp_path, sys.executable, "-c", PROBE)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == 1 and seen["cpus"] == 2.0
    host, port = seen["address"].rsplit(":", 1)
    with socket.socket() as s:  # the head's GCS port is closed again: the cluster was stopped
        assert s.connect_ex((host, int(port))) != 0
    assert (tmp_path / "logs" / "ray-head.log").is_file()


def test_exit_code_is_the_commands_and_a_configured_cluster_is_used_as_is(tmp_path: Path) -> None:
    failed = _with_ray(tmp_path, sys.executable, "-c", "raise SystemExit(3)")
    assert failed.returncode == 3
    given = _with_ray(tmp_path, sys.executable, "-c", "import os; print(os.environ['RAY_ADDRESS'])",
                      env={"RAY_ADDRESS": "10.9.8.7:6379"}, logs="given-logs")
    assert given.returncode == 0 and given.stdout.strip() == "10.9.8.7:6379"
    assert not (tmp_path / "given-logs").exists()  # no head node was started
