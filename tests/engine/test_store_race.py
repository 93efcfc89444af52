"""Concurrent stages on one SQLite MLflow store (``transferbench repro --jobs N``, ``dvc queue start -j N``):
real processes, started at the same instant on an empty store, each find-or-create the experiment and the
study's parent run. One experiment and one parent run must come out, the id every process got."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from transferbench.engine.tracking import KIND_TAG, STUDY_TAG

PROCESSES = 3
CODE = """
import sys, time
from transferbench.engine.tracking import RunRegistry
uri, artifacts, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
registry = RunRegistry(tracking_uri=uri, experiment="race", artifact_location=artifacts)
print(registry.experiment_id, registry.study_run("s"), registry.keyed_run(study="s", kind="sensitivity",
      run_key="k", run_name="k"))
# two stages of one task log the same split manifest as a dataset input (MLflow finds, then inserts it),
# again at one instant: the steps above are serialised, so the processes no longer run in step
import pandas as pd, pathlib
run = registry.client.create_run(registry.experiment_id).info.run_id
time.sleep(max(0.0, start + 20 - time.time()))
registry.log_manifests(run, {"train": pd.DataFrame({"filename": ["a.png"], "label": ["x"]})},
                       {"train": pathlib.Path("train.csv")}, task="t", digests={"train": "0123456789"}, targets="label")
"""


def test_processes_racing_on_an_empty_sqlite_store_create_one_of_each(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    start = time.time() + 8  # every process has imported MLflow by then
    children = [subprocess.Popen([sys.executable, "-c", CODE, uri, str(tmp_path / "artifacts"), str(start)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    results = [child.communicate(timeout=180) for child in children]
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err[-3000:]
    assert len({out for out, _ in results}) == 1, results  # the same three ids in every process

    client = MlflowClient(uri)
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "race"]
    experiment = client.get_experiment_by_name("race").experiment_id
    parents = client.search_runs([experiment], f"tags.`{STUDY_TAG}` = 's' and tags.`{KIND_TAG}` = 'study'")
    keyed = client.search_runs([experiment], f"tags.`{STUDY_TAG}` = 's' and tags.`{KIND_TAG}` = 'sensitivity'")
    assert len(parents) == 1 and len(keyed) == 1
