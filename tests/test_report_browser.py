"""The smoke study's report, ``reports/index.html``, opened from disk in a real browser (headless Chromium).

Runs after ``make repro`` (``make test-study``): the page must load without console errors, show every
image, hold the rank table's own numbers, and link only runs that exist in the study's MLflow store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import yaml

from browser import chromium, console_errors, screenshot

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("answer", "tables", "tasks", "sensitivity", "validation", "registry", "identity")


def _store(params: dict) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params["tracking"]["tracking_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{REPO / uri.removeprefix('sqlite:///')}"
    return uri


@pytest.mark.study
def test_the_smoke_study_report_in_a_browser() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    reports = REPO / params["data"]["reports_dir"]
    page = reports / "index.html"
    if not page.is_file():
        pytest.fail(f"{page} is missing: run `make repro` first")
    table = json.loads((reports / "rank_table.json").read_text())
    answer = json.loads((reports / "answer.json").read_text())
    with chromium() as driver:
        driver.get(page.as_uri())
        screenshot(driver, "report-top")
        assert console_errors(driver) == []
        for section in SECTIONS:
            assert driver.find_elements("id", section), f"section #{section} is missing"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) >= 4
        broken = [alt for alt, complete, width in images if not complete or width == 0]
        assert broken == [], f"images that did not load: {broken}"
        cells = driver.execute_script(
            "return Array.from(document.querySelectorAll('td[data-mean]')).map(c => [c.dataset.evaluation, "
            "c.dataset.backbone, c.dataset.mean, c.dataset.rank, c.innerText]);")
        verdict = driver.find_element("id", "verdict").text
        banner = driver.find_elements("id", "random-init-banner")
        run_ids = driver.execute_script(
            "return Array.from(document.querySelectorAll('a[data-run-id]')).map(a => a.dataset.runId);")
        driver.execute_script("document.getElementById('tables').scrollIntoView();")
        screenshot(driver, "report-tables")

    expected = {(e, b): c for e, entry in table["tasks"].items() for b, c in entry["backbones"].items()}
    shown = {(e, b): (float(mean), float(rank), text) for e, b, mean, rank, text in cells}
    assert set(shown) == set(expected)
    for key, cell in expected.items():
        mean, rank, text = shown[key]
        assert mean == cell["mean"] and rank == cell["rank"], key
        assert f"{cell['mean']:.4f}" in text, (key, text)
    assert verdict == answer["verdict"] and "significant" in verdict
    random_init = any(b["weights"] == "none" for b in table["backbones"].values())
    assert bool(banner) == random_init and (not random_init or "RANDOM-INIT" in verdict)

    client = mlflow.MlflowClient(tracking_uri=_store(params))
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    assert run_ids, "no run links"
    for run_id in set(run_ids):
        run = client.get_run(run_id)
        assert run.info.experiment_id == experiment.experiment_id and run.info.lifecycle_stage == "active"
