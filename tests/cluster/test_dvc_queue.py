"""Two queued DVC experiments at once on the default SQLite MLflow store: ``dvc queue start -j 2``.

Real parts: a git + DVC repository whose one stage is a real ``transferbench finetune`` (Ray Train local
mode), params with the default, relative store (``sqlite:///mlruns.db``, artifacts in ``mlartifacts``),
two experiments queued with ``dvc exp run --queue -S`` and run by DVC's own queue workers, two at once,
each in a temporary copy of the repository. Both must finish, into the repository's one store (DVC's
``$DVC_ROOT``, not the copies'), with one MLflow experiment, one study parent run and one child run each:
no "database is locked", no duplicate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from engine.conftest import toy_params, toy_splits  # noqa: F401 -- the session fixture
from transferbench.engine.tracking import KIND_TAG, STUDY_TAG

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STAGE = ("python -m transferbench.cli --params params.yaml finetune --task toy --backbone test_resnet --seed 0 "
         "--metrics-dir metrics --plots-dir plots")


def _run(args: list[str], root: Path, env: dict) -> str:
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_two_queued_experiments_at_once_share_the_sqlite_store_without_duplicates(toy_splits, tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT")},
           "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    params = toy_params(toy_splits, ray={"storage_path": "ray_results"},
                        tracking={"tracking_uri": "sqlite:///mlruns.db", "artifact_location": "mlartifacts",
                                  "system_metrics": False})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"finetune": {
        "cmd": STAGE, "params": ["finetune"], "metrics": [{"metrics": {"cache": False}}],
        "outs": [{"metrics.runs": {"cache": False}}]}}}))  # the runs' records, as dvc.yaml declares them
    (root / ".gitignore").write_text("mlruns.db*\nmlartifacts/\nray_results/\nplots/\n")
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                 ["git", "config", "user.name", "t"], [str(BIN / "dvc"), "init", "-q"],
                 [str(BIN / "dvc"), "config", "core.analytics", "false"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "toy study"]):
        _run(args, root, env)
    for epochs in ("2", "3"):
        _run([str(BIN / "dvc"), "exp", "run", "--queue", "-S", f"finetune.max_epochs={epochs}"], root, env)

    _run([str(BIN / "dvc"), "queue", "start", "-j", "2"], root, env)
    try:
        deadline = time.monotonic() + 600
        while True:
            status = _run([str(BIN / "dvc"), "queue", "status"], root, env)
            rows = [line for line in status.splitlines() if line.strip() and "Task" not in line
                    and "Worker status" not in line and "worker" not in line.lower()]
            if rows and not any(s in line for line in rows for s in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, f"the queue did not finish within 600 s:\n{status}"
            time.sleep(2)
    finally:
        subprocess.run([str(BIN / "dvc"), "queue", "stop", "--kill"], cwd=root, env=env, capture_output=True,
                       timeout=120)
    assert sum("Success" in line for line in rows) == 2, status  # neither failed (e.g. "database is locked")

    assert not list((root / ".dvc" / "tmp" / "exps").rglob("mlruns.db")), "an experiment wrote its own store"
    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")  # the repository's store, shared by both
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "transferbench"]
    experiment = client.get_experiment_by_name("transferbench").experiment_id
    parents = client.search_runs([experiment], f"tags.`{STUDY_TAG}` = 'toy-study' and tags.`{KIND_TAG}` = 'study'")
    children = client.search_runs([experiment], f"tags.`{KIND_TAG}` = 'finetune'")
    assert len(parents) == 1, [p.info.run_id for p in parents]
    assert sorted(c.data.params["finetune.max_epochs"] for c in children) == ["2", "3"]  # one run each
    assert all(c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for c in children)
    artifacts = client.get_experiment(experiment).artifact_location
    assert artifacts == (root / "mlartifacts").resolve().as_uri()  # not a temporary copy's
