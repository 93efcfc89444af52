"""The MLflow Project entry points really run: `mlflow run . -e split --env-manager local`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_split_entry_point_runs_through_mlflow_run(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] |= {key: str(tmp_path / key) for key in ("raw_dir", "generated_dir", "splits_dir", "cache_dir",
                                                          "reports_dir")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run([BIN / "transferbench", "--params", str(params), "generate", "synthetic"], check=True, env=env)

    done = subprocess.run([BIN / "mlflow", "run", str(ROOT), "-e", "split", "-P", "task=synthetic",
                           "-P", f"params={params}", "--env-manager", "local", "--experiment-name", "mlproject"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "val", "test"):
        frame = pd.read_csv(tmp_path / "splits_dir" / "synthetic" / f"{split}.csv")
        assert len(frame) > 0 and {"filename", "label", "group"} <= set(frame.columns)
    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("mlproject").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["task"] == "synthetic" and run.data.tags["mlflow.project.entryPoint"] == "split"
