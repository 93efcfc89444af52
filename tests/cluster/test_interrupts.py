"""Ctrl-C or SIGTERM to ``transferbench with-ray -- transferbench repro`` (``make repro``) mid fine-tune.

Real parts: a git + DVC repo whose one stage is a real ``transferbench finetune``, a real Ray head
node (``with-ray``) with a Ray Train worker actor, and real signals sent to the process group, as a
terminal's Ctrl-C or ``kill -TERM -<pgid>`` of ``make repro`` would. Afterwards no process of the
tree may be left (the Ray head's raylet, GCS and workers included), the head's port must be closed,
and a rerun must complete, resuming the interrupted run in the same MLflow run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from engine.conftest import toy_params, toy_splits  # noqa: F401 -- the session fixture

from transferbench.engine.run_files import read_run
from transferbench.engine.tracking import KIND_TAG

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STAGE = ("python -m transferbench.cli --params params.yaml finetune --task toy --backbone test_resnet --seed 0 "
         "--metrics-dir metrics --plots-dir plots")


def _repo(root: Path, splits: Path, num_workers: int) -> tuple[Path, dict]:
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    root.mkdir()
    for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"],
                 [str(BIN / "dvc"), "config", "core.analytics", "false"]):
        subprocess.run(args, cwd=root, env=env, check=True)
    params = toy_params(splits, ray={"num_workers": num_workers, "storage_path": str(root / "ray_results")},
                        finetune={"max_epochs": 16, "early_stop_patience": 50},
                        tracking={"tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
                                  "artifact_location": str(root / "mlartifacts"), "system_metrics": True})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"finetune": {
        "cmd": STAGE, "params": ["finetune", "ray"], "metrics": [{"metrics": {"cache": False}}],
        "outs": [{"metrics.runs": {"cache": False}}]}}}))  # the runs' records, as dvc.yaml declares them
    return root, env


def _with_ray(root: Path, env: dict) -> subprocess.Popen:
    """``with-ray -- transferbench repro --jobs 2`` (``make repro``) as a terminal job: the leader of a process
    group of its own. With a Ray head the stage runs as a Ray task, in local mode as a local process."""
    command = [sys.executable, "-m", "transferbench.cli", "--params", "params.yaml", "with-ray", "--cpus", "2",
               "--log-dir", str(root / "ray-logs"), "--", str(BIN / "transferbench"), "repro", "--jobs", "2"]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _await_training(root: Path, job: subprocess.Popen, epoch: int = 2) -> None:
    deadline = time.monotonic() + 300
    while not list((root / "ray_results").glob(f"*/epoch_{epoch:04d}/state.pt")):
        if job.poll() is not None:
            pytest.fail(f"the job ended before epoch {epoch}:\n{job.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} within 300 s"
        time.sleep(0.1)


def _survivors(processes: list[psutil.Process], timeout: float) -> list[str]:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    described = []
    for process in alive:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:160]}")
        except psutil.Error:
            pass
    return described


# with-ray treats SIGINT, SIGTERM and SIGHUP alike; the two cases cover a Ray head with a worker actor
# (SIGTERM, as `kill -TERM -<pgid>` of make repro) and local mode (SIGINT, as Ctrl-C in a terminal).
# SIGKILL: nothing of the killed group can stop the rest; the watchers (cluster.reap_orphaned_group) that
# with-ray and the runner start beside each process group they start do, and the rerun finds no stale lock.
@pytest.mark.parametrize(("signum", "num_workers"), [(signal.SIGTERM, 1), (signal.SIGINT, 0), (signal.SIGKILL, 1)],
                         ids=["SIGTERM-ray-worker", "SIGINT-local-mode", "SIGKILL-ray-worker"])
def test_an_interrupted_repro_leaves_no_process_and_a_rerun_resumes_the_run(toy_splits, tmp_path, signum,
                                                                              num_workers):
    root, env = _repo(tmp_path / "repo", toy_splits, num_workers)
    job = _with_ray(root, env)
    _await_training(root, job)
    tree = psutil.Process(job.pid).children(recursive=True)
    names = " ".join(p.name() for p in tree)
    if num_workers:  # the head node's daemons and the Ray Train worker are in the tree being stopped
        assert "raylet" in names and "gcs_server" in names, names
        head_log = (root / "ray-logs" / "ray-head.log").read_text()
    else:
        assert "raylet" not in names and not (root / "ray-logs").exists(), "local mode started a Ray head"
    os.killpg(job.pid, signum)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), out[-4000:]
    left = _survivors(tree, timeout=60)
    assert not left, "still running after the interrupt:\n" + "\n".join(left)
    if num_workers:
        port = int(re.search(r"Ray head node at [\d.]+:(\d+)", out).group(1))
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.2", port)) != 0, "the Ray head's port is still open"
        assert "Ray runtime started" in head_log
    if not num_workers:
        return

    # make repro again: it completes, resuming the interrupted run (one MLflow run, every epoch logged once).
    rerun = _with_ray(root, env)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-6000:]
    result = read_run(root / "metrics", "toy", "test_resnet", 0, "full")
    # From a checkpoint, not from scratch: the one Ray Train had registered, which may lag the newest
    # directory on disk by an epoch.
    assert result["resumed_at_epochs"] and result["resumed_at_epochs"][0] >= 1
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("transferbench")
    (child,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'finetune'")
    assert child.info.run_id == result["mlflow_run_id"] and child.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val_loss"))
    assert steps == list(range(1, result["epochs_run"] + 1))
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr
