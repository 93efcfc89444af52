"""``transferbench with-ray -- CMD``: one real Ray head node for the command's lifetime, then gone;
none when every fine-tune runs in Ray Train local mode (``ray.num_workers: 0``, the smoke study)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

def _params(tmp_path: Path, num_workers: int) -> Path:
    """The shipped params.yaml with ``ray.num_workers`` set (the shipped smoke study uses local mode)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["ray"]["num_workers"] = num_workers
    path = tmp_path / f"params-{num_workers}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _with_ray(tmp_path: Path, *cmd: str, env: dict | None = None, logs: str = "logs",
              num_workers: int = 1) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "transferbench.cli", "--params", str(_params(tmp_path, num_workers)),
                           "with-ray", "--cpus", "2", "--log-dir", str(tmp_path / logs), "--", *cmd],
                          cwd=tmp_path, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)


# One head node, for one command that probes the cluster and then runs a 6-second Ray Train run.
PROBE_THEN_TRAIN = (
    "import json, os, tempfile, time, ray; from ray.train import RunConfig, ScalingConfig; "
    "from ray.train.torch import TorchTrainer; from transferbench.engine.cluster import connect; "
    "connect(None); "
    "print(json.dumps({'address': os.environ['RAY_ADDRESS'], 'nodes': len(ray.nodes()), "
    "'cpus': ray.cluster_resources().get('CPU')}), flush=True); "
    "TorchTrainer(lambda config: time.sleep(6), scaling_config=ScalingConfig(num_workers=1), "
    "run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit(); time.sleep(2)")


def test_the_command_joins_a_head_node_that_is_stopped_afterwards(tmp_path: Path) -> None:
    done = _with_ray(tmp_path, sys.executable, "-c", PROBE_THEN_TRAIN)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert seen["nodes"] == 1 and seen["cpus"] == 2.0
    host, port = seen["address"].rsplit(":", 1)
    with socket.socket() as s:  # the head's GCS port is closed again: the cluster was stopped
        assert s.connect_ex((host, int(port))) != 0
    assert (tmp_path / "logs" / "ray-head.log").is_file()
    # Ray Train's PlacementGroupCleaner: without the dashboard its State API query fails every second
    # (6 times in this run); the jobs transferbench starts log that once, saying why.
    warned = [line for line in (done.stdout + done.stderr).splitlines()
              if "Failed to query Ray Train Controller actor state" in line]
    assert len(warned) == 1, "\n".join(warned) or done.stdout + done.stderr
    assert "transferbench: shown once per run" in warned[0] and "PlacementGroupCleaner" in warned[0]


def test_exit_code_is_the_commands_and_a_configured_cluster_is_used_as_is(tmp_path: Path) -> None:
    # The command's exit code comes back the same way with or without a head node (run_interruptible).
    failed = _with_ray(tmp_path, sys.executable, "-c", "raise SystemExit(3)", num_workers=0)
    assert failed.returncode == 3
    given = _with_ray(tmp_path, sys.executable, "-c", "import os; print(os.environ['RAY_ADDRESS'])",
                      env={"RAY_ADDRESS": "10.9.8.7:6379"}, logs="given-logs")
    assert given.returncode == 0 and given.stdout.strip() == "10.9.8.7:6379"
    assert not (tmp_path / "given-logs").exists()  # no head node was started


def test_local_mode_starts_no_head_node(tmp_path: Path) -> None:
    done = _with_ray(tmp_path, sys.executable, "-c", "import os; print(os.environ.get('RAY_ADDRESS', 'none'))",
                     num_workers=0)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "none" and "no Ray head node" in done.stdout
    assert not (tmp_path / "logs").exists()  # no head node was started
