"""The report stage on a small study with a real MLflow store: its page, its answer and its lineage.

Every run is a real MLflow run with its ``predictions/test_predictions.csv`` artifact, built so that its
accuracy is a chosen number; the answer's differences, intervals and verdict are checked against
values computed by hand from those predictions.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from study_files import assert_ranks_file, metrics_record, write_params
from transferbench.config import load_settings
from transferbench.engine.run_files import read_run, write_result
from transferbench.engine.tracking import RunRegistry
from transferbench.stages import compare, report

N_IMAGES = 40
# evaluation -> backbone -> per-seed accuracy (multiples of 1/40): test_vit is far better on "clear", tied on "tie"
SCORES = {
    "clear": {"test_resnet": [0.5, 0.55], "test_convnext": [0.45, 0.5], "test_vit": [0.95, 1.0],
              "test_vit2": [0.6, 0.6]},
    "tie": {"test_resnet": [0.7, 0.7], "test_convnext": [0.6, 0.65], "test_vit": [0.7, 0.7], "test_vit2": [0.5, 0.5]},
    "third": {"test_resnet": [0.8, 0.75], "test_convnext": [0.5, 0.5], "test_vit": [0.7, 0.75],
              "test_vit2": [0.6, 0.55]},
}


def predictions(score: float) -> pd.DataFrame:
    """40 test images, labels alternating a/b; the first ``score * 40`` predicted right, the rest wrong."""
    labels = ["a" if i % 2 == 0 else "b" for i in range(N_IMAGES)]
    right = round(score * N_IMAGES)
    predicted = [label if i < right else ("b" if label == "a" else "a") for i, label in enumerate(labels)]
    return pd.DataFrame({"filename": [f"img{i:02d}.png" for i in range(N_IMAGES)], "label": labels,
                         "prediction": predicted})


class Page(HTMLParser):
    """What the tests read from the page: rank cells, run links, images, the verdict."""

    def __init__(self) -> None:
        super().__init__()
        self.cells, self.links, self.images, self.comparisons = [], [], [], []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "data-mean" in a:
            self.cells.append(a)
        if tag == "tr" and "data-difference" in a:
            self.comparisons.append(a)
        if tag == "a" and "data-run-id" in a:
            self.links.append(a)
        if tag == "img":
            self.images.append(a)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
def small_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    params = write_params(tmp_path, tasks={t: "accuracy" for t in SCORES}, backbones=list(SCORES["clear"]),
                          seeds=[0, 1], study="report-study", tracking_uri=uri, experiment="report-exp",
                          artifact_location=str(tmp_path / "artifacts"))
    settings = load_settings(params)
    registry = RunRegistry.from_settings(settings.tracking)
    for task, per_backbone in SCORES.items():
        for backbone, scores in per_backbone.items():
            for seed, score in enumerate(scores):
                run_id, _ = registry.child_run(study="report-study", run_key=f"{task}.{backbone}.{seed}",
                                               run_name=f"{task}/{backbone}/full/seed{seed}",
                                               tags={"task": task, "backbone": backbone, "seed": seed})
                csv = tmp_path / "predictions" / "test_predictions.csv"
                csv.parent.mkdir(exist_ok=True)
                predictions(score).to_csv(csv, index=False)
                registry.client.log_artifact(run_id, str(csv), "predictions")
                write_result(tmp_path / "metrics", metrics_record(task, backbone, seed, "accuracy", score,
                                                                  run_id=run_id))
    compare.run(settings)
    assert assert_ranks_file(params)["n_evaluations"] == len(SCORES)
    return params


def test_the_report_shows_the_rank_table_links_runs_and_answers_with_intervals(small_study: Path) -> None:
    settings = load_settings(small_study)
    result = report.run(settings, mlflow_url="http://mlflow.example:5000/")
    table = json.loads((Path(settings.data.reports_dir) / "rank_table.json").read_text())
    page = Page()
    page.feed(result.html.read_text())

    # every cell of the rank table, with the table's own numbers (the all-evaluations table, then each group's)
    seen = {(c["data-evaluation"], c["data-backbone"]): c for c in page.cells}
    for evaluation, entry in table["tasks"].items():
        for backbone, cell in entry["backbones"].items():
            shown = seen[(evaluation, backbone)]
            assert float(shown["data-mean"]) == cell["mean"] and float(shown["data-rank"]) == cell["rank"]
    # every link opens an existing run of this study's experiment, on the given MLflow address
    client = mlflow.MlflowClient(settings.tracking.tracking_uri)
    run_ids = {link["data-run-id"] for link in page.links}
    assert len(run_ids) == 3 * 4 * 2 + 1  # every seed's run and the parent
    for link in page.links:
        assert link["href"].startswith("http://mlflow.example:5000/#/experiments/")
        assert client.get_run(link["data-run-id"]).info.lifecycle_stage == "active"
    # self-contained: every image is inlined, nothing is fetched
    assert page.images and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    assert not re.search(r"""(src|href)=["']?(https?:)?//(?!mlflow\.example)""", result.html.read_text())

    answer = json.loads(result.answer.read_text())
    by_eval = {c["evaluation"]: c for c in answer["comparisons"]}
    # "clear": best ConvNet test_resnet (0.525), best Transformer test_vit (0.975): +0.45, every resample positive
    clear = by_eval["clear"]
    assert (clear["convnet"], clear["transformer"], clear["winner"]) == ("test_resnet", "test_vit", "transformer")
    assert clear["difference"] == pytest.approx(0.975 - 0.525)
    assert clear["significant"] and 0 < clear["low"] <= clear["difference"] <= clear["high"]
    # McNemar per seed: resnet right on its first 20 (22) images, vit on its first 38 (40): 18 discordant pairs,
    # all in vit's favour -> exact (binomial) p = 2 * 0.5**18 on each seed
    p_values = [s["p_value"] for s in clear["mcnemar"]["per_seed"]]
    assert p_values == pytest.approx([2 * 0.5 ** 18] * 2)
    # "tie": both best at 0.7 on the same images: difference 0, interval [0, 0], not significant
    tie = by_eval["tie"]
    assert tie["winner"] == "tie" and tie["difference"] == 0 and (tie["low"], tie["high"]) == (0, 0)
    assert tie["significant"] is False
    assert "RANDOM-INIT" in answer["verdict"] and "not significant" in answer["verdict"]
    assert answer["verdict"] in "".join(page.text)

    # the study parent run keeps the page and says what the study found
    parent = client.get_run(result.parent_run_id)
    assert "report/index.html" in [a.path for a in client.list_artifacts(result.parent_run_id, "report")]
    description = parent.data.tags["mlflow.note.content"]
    assert answer["verdict"] in description and "test_vit" in description


def test_the_report_names_the_random_init_backbones(small_study: Path) -> None:
    result = report.run(load_settings(small_study))
    html = result.html.read_text()
    assert 'id="random-init-banner"' in html and "test_resnet, test_convnext, test_vit, test_vit2" in html
    assert "http://127.0.0.1:5000/#/experiments/" in html  # report.mlflow_url's default


def test_a_run_without_predictions_leaves_its_evaluation_untested_and_named(small_study: Path) -> None:
    run_id = read_run(small_study.parent / "metrics", "third", "test_resnet", 1)["mlflow_run_id"]
    (artifact,) = small_study.parent.glob(f"artifacts/**/{run_id}/artifacts/predictions/test_predictions.csv")
    artifact.unlink()
    result = report.run(load_settings(small_study))
    by_eval = {c["evaluation"]: c for c in json.loads(result.answer.read_text())["comparisons"]}
    assert by_eval["third"]["significant"] is None and run_id in by_eval["third"]["untested_reason"]
    assert by_eval["clear"]["significant"] is True  # the others are still tested
    assert "not tested" in result.html.read_text()
