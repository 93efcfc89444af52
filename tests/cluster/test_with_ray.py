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


TRAIN_SIX_SECONDS = ("import tempfile, time; from ray.train import RunConfig, ScalingConfig; "
                     "from ray.train.torch import TorchTrainer; from transferbench.cluster import connect; "
                     "connect(None); "
                     "TorchTrainer(lambda config: time.sleep(6), scaling_config=ScalingConfig(num_workers=1), "
                     "run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit(); time.sleep(2)")


def test_ray_trains_placement_group_cleaner_warns_once_per_run_not_every_second(tmp_path: Path) -> None:
    # Without the dashboard the cleaner's State API query fails every second (6 times in this run);
    # the jobs transferbench starts log that once, saying why.
    done = _with_ray(tmp_path, sys.executable, "-c", TRAIN_SIX_SECONDS)
    assert done.returncode == 0, done.stdout + done.stderr
    warned = [line for line in (done.stdout + done.stderr).splitlines()
              if "Failed to query Ray Train Controller actor state" in line]
    assert len(warned) == 1, "\n".join(warned) or done.stdout + done.stderr
    assert "transferbench: shown once per run" in warned[0] and "PlacementGroupCleaner" in warned[0]
