"""The retrieve stage end to end (issue #21, item 3): the generated Oxford-format task, a random-init timm
test model, a real MLflow SQLite store. Checks the mAP beats a random ranking, the run's params, metrics and
figures, the logged feature extractor loading back and reproducing the cached features, the feature cache
(a rerun extracts nothing), and bounding-box queries as a parameter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import yaml

from transferbench.config import load_settings
from transferbench.data.registry import get_dataset
from transferbench.data.synthetic_retrieval import generate
from transferbench.engine.run_files import read_run
from transferbench.evaluation import retrieval
from transferbench.stages import retrieve

REPO = Path(__file__).resolve().parents[2]


def _params(root: Path, query: str = "image") -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(generated_dir=str(root / "generated"), cache_dir=str(root / "cache"))
    raw["tasks"]["synthetic_retrieval"]["retrieval"] = {"query": query}
    raw["tracking"].update(tracking_uri=f"sqlite:///{root / 'mlruns.db'}", artifact_location=str(root / "art"),
                           system_metrics=False)
    raw["compare"]["metrics_dir"] = str(root / "metrics")
    path = root / f"params_{query}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("retrieve")
    settings = load_settings(REPO / "params.yaml").data.synthetic_retrieval
    generate(root / "generated" / "synthetic_retrieval", **settings.model_dump())
    return root


def test_retrieve_tracks_a_run_whose_model_loads_back_and_caches_features(generated, monkeypatch):
    monkeypatch.chdir(generated)
    settings = load_settings(_params(generated))
    result = retrieve.run(settings, task="synthetic_retrieval", backbone="test_resnet", plots_dir=generated / "plots")

    assert result["mode"] == "frozen" and result["val_score"] is None and result["weights_label"] == "random-init"
    assert result["test_map"] > result["baseline_score"] + 0.3  # random-init features beat a random ranking
    assert read_run(generated / "metrics", "synthetic_retrieval", "test_resnet", mode="frozen") == result
    # mAP (and the random ranking's) in the metrics file; the per-query AP and what ran in its record
    metrics = json.loads((generated / "metrics" / "synthetic_retrieval" / "test_resnet" / "frozen.json").read_text())
    assert metrics["test_map"] == result["test_map"] and metrics["baseline_score"] == result["baseline_score"]
    assert "test_ap" not in metrics and all(v is None or type(v) in (int, float) for v in metrics.values()), metrics
    record = json.loads((generated / "metrics.runs" / "synthetic_retrieval" / "test_resnet" / "frozen.json")
                        .read_text())
    assert record["test_ap"] == result["test_ap"] and isinstance(record["test_ap"], dict) and record["test_ap"]
    assert "test_map" not in record and record["mlflow_run_id"] == result["mlflow_run_id"]
    curve = np.loadtxt(generated / "plots" / "synthetic_retrieval" / "test_resnet.csv", delimiter=",", skiprows=1)
    assert curve[0, 0] == 0.0 and curve[-1, 0] == 1.0 and ((0 <= curve[:, 1]) & (curve[:, 1] <= 1)).all()

    client = mlflow.MlflowClient(settings.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["task_kind"] == "retrieval" and run.data.tags["random_init"] == "true"
    assert run.data.params["query"] == "image" and run.data.params["data_version"] == result["data_version"]
    assert run.data.metrics["test_map"] == pytest.approx(result["test_map"])
    assert len([k for k in run.data.metrics if k.startswith("ap.")]) == result["n_queries"]
    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert len(figures) >= 2 and all(name.endswith(".png") for name in figures)

    # the logged feature extractor loads back and gives the features the stage ranked with
    (cache,) = (generated / "cache" / "retrieval" / "synthetic_retrieval" / "test_resnet").glob("*.database.npz")
    cached = np.load(cache)["features"]
    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{result['mlflow_run_id']}/model")
    paths = sorted((generated / "generated" / "synthetic_retrieval" / "images").iterdir())[:4]
    features = retrieval.extract_features(model, paths, boxes=None, img_size=result["img_size"],
                                          resize=result["resize"], mean=None, std=None, batch_size=4)
    names = [Path(p).stem for p in get_dataset("synthetic_retrieval").manifest(
        generated / "generated" / "synthetic_retrieval")["filename"]]
    np.testing.assert_allclose(features, cached[[names.index(p.stem) for p in paths]], atol=1e-5)

    # a rerun with unchanged inputs reads the cache (its bytes untouched) and reproduces the result
    stamp = cache.stat().st_mtime_ns
    again = retrieve.run(settings, task="synthetic_retrieval", backbone="test_resnet", plots_dir=generated / "plots")
    assert cache.stat().st_mtime_ns == stamp and again["test_map"] == result["test_map"]
    assert again["mlflow_run_id"] == result["mlflow_run_id"]  # same inputs: the same (keyed) MLflow run


def test_a_rerun_after_a_new_commit_keeps_the_tracked_run(generated, tmp_path, monkeypatch):
    """Unchanged inputs under a new git commit (what `dvc repro` does after any source change): the finished
    MLflow run of those inputs is kept, not logged into again (MLflow refuses a changed param value)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("1\n")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    settings = load_settings(_params(generated))
    first = retrieve.run(settings, task="synthetic_retrieval", backbone="test_vit", plots_dir=tmp_path / "plots")
    (repo / "a.txt").write_text("2\n")
    subprocess.run([*git, "commit", "-qam", "two"], check=True)
    again = retrieve.run(settings, task="synthetic_retrieval", backbone="test_vit", plots_dir=tmp_path / "plots")
    assert again["mlflow_run_id"] == first["mlflow_run_id"] and again["test_map"] == first["test_map"]
    run = mlflow.MlflowClient(settings.tracking.tracking_uri).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED" and again["git_commit"] == run.data.params["git_commit"] == first["git_commit"]


def test_random_init_features_are_the_same_in_every_process(generated, tmp_path):
    """A fresh process without the cache draws the same random-init backbone (seed 0): same mAP, same key."""
    params = _params(generated)
    results = []
    for attempt in range(2):
        cache = tmp_path / f"cache{attempt}"
        raw = yaml.safe_load(params.read_text())
        raw["data"]["cache_dir"] = str(cache)
        raw["compare"]["metrics_dir"] = str(tmp_path / f"metrics{attempt}")
        path = tmp_path / f"params{attempt}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        done = subprocess.run([sys.executable, "-m", "transferbench.cli", "--params", str(path), "retrieve", "--task",
                               "synthetic_retrieval", "--backbone", "test_vit", "--plots-dir", str(tmp_path / "p")],
                              cwd=generated, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(read_run(tmp_path / f"metrics{attempt}", "synthetic_retrieval", "test_vit", mode="frozen"))
        assert list(cache.rglob("*.database.npz"))  # extracted afresh: the first attempt's cache is elsewhere
    assert results[0]["test_map"] == results[1]["test_map"]
    assert results[0]["test_ap"] == results[1]["test_ap"]


def test_bounding_box_queries_are_a_parameter(generated, monkeypatch):
    monkeypatch.chdir(generated)
    settings = load_settings(_params(generated, "bbox"))
    result = retrieve.run(settings, task="synthetic_retrieval", backbone="test_resnet", plots_dir=generated / "plots")
    assert result["query"] == "bbox" and result["test_map"] > result["baseline_score"]
    queries = list((generated / "cache" / "retrieval" / "synthetic_retrieval" / "test_resnet").glob("*.queries.npz"))
    assert len(queries) == 1  # the boxes' own features, cached apart from the database's
