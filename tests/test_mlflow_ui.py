"""The study's MLflow store in ``mlflow ui``, opened in a real browser (headless Chromium, tests/browser.py).

MLflow 3.17's UI opens an experiment by the sidebar's workflow ("GenAI" or "Model training"): the plain
``#/experiments/<id>`` opens the GenAI traces overview, empty for this project, in a browser that never chose
"Model training", whatever the experiment's ``mlflow.experimentKind`` tag says. ``experiment_ui_url`` names the
training workflow, so the links the project gives open the runs table: the study's parent run, its child runs
under it (each with its description), and the registered models ``<study>.<task>`` with their aliases.

The study test (marker ``study``) reads the store ``make repro`` made; the other one builds a tiny store with
``RunRegistry``. Screenshots go to ``artifacts/screenshots/`` (``$TRANSFERBENCH_SCREENSHOTS``), which CI uploads.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from browser import TIMEOUT, chromium, console_errors, screenshot
from transferbench.engine.cluster import free_port
from transferbench.engine.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    RunRegistry,
    experiment_ui_url,
)

REPO = Path(__file__).resolve().parents[1]
# read at import: tests/conftest.py clears $MLFLOW_TRACKING_URI for each test (the smoke CI job sets it)
STORE_ENV = os.environ.get("MLFLOW_TRACKING_URI")
MLFLOW = Path(sys.executable).with_name("mlflow")
# Console errors of MLflow's own UI, on any store: it asks a server without authentication who the user is (the
# 404 answer is logged), and its resizing tables trip Chromium's benign ResizeObserver loop report
MLFLOW_UI_NOISE = (r"/ajax-api/2\.0/mlflow/users/current - Failed to load resource: .* 404",
                   r"ResizeObserver loop completed with undelivered notifications")


@contextlib.contextmanager
def mlflow_ui(store: str, workdir: Path) -> Iterator[str]:
    """``mlflow ui`` on ``store`` (loopback, a free port); yields its URL once it answers, stops it on exit."""
    port = free_port()
    log = workdir / "mlflow-ui.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(MLFLOW), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 2 * TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow ui exited ({server.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not answer within {2 * TIMEOUT} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:  # the server and the worker it started share its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def _until(driver, condition, message: str):
    """WebDriverWait(TIMEOUT).until; a timeout leaves a screenshot of the page (``timeout-<n>.png``)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, TIMEOUT).until(condition, message)
    except TimeoutException:
        screenshot(driver, f"timeout-{time.strftime('%H%M%S')}")
        raise


def _text(value: str) -> str:
    """An XPath string literal (names here hold no double quote)."""
    assert '"' not in value, value
    return f'"{value}"'


def _visible_text(driver, text: str):
    """Wait for an element whose own text is ``text`` and return it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    return _until(driver, ec.visibility_of_element_located(
        (By.XPATH, f"//*[normalize-space(text())={_text(text)}]")), f"{text!r} not shown")


def _close_assistant(driver) -> None:
    """MLflow opens its assistant panel on first use; closed, the runs table has the window's width."""
    for button in driver.find_elements("css selector", "button[aria-label='Close']"):
        with contextlib.suppress(Exception):
            if button.is_displayed():
                button.click()


def _open_runs(driver, ui: str, experiment_id: str) -> None:
    """The experiment's page as the project links it: it must be the runs table, not the GenAI overview."""
    driver.get(experiment_ui_url(ui, experiment_id))
    _until(driver, lambda d: "/runs" in d.current_url and "workflowType=machine_learning" in d.current_url,
           "the experiment page did not stay on the training runs")


def _expand(driver, parent_run_id: str) -> None:
    """Click the expander in the Run Name cell of the parent's row (the table's rows carry the run id)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    expander = (By.CSS_SELECTOR, f"[role=row][row-id='{parent_run_id}'] button[data-component-id*='runnamecell']")
    _until(driver, ec.element_to_be_clickable(expander), "the parent run has no expander").click()


def _check_run_page(driver, ui: str, experiment_id: str, run_id: str, description: str) -> None:
    """The run's page shows its description (Markdown, rendered: its first words, without the markup)."""
    driver.get(experiment_ui_url(ui, experiment_id, run_id))
    words = re.findall(r"[\w.-]+", description)[:6]
    _until(driver, lambda d: all(w in d.find_element("tag name", "body").text for w in words),
           f"run {run_id}: its description ({' '.join(words)}...) is not shown")


@pytest.mark.slow  # ~40 s on two cores: the server's start and the UI's first page dominate
def test_a_registry_store_opens_on_its_training_runs_in_mlflow_ui(tmp_path):
    """A store made by RunRegistry: the project's experiment link shows the parent run and, under it, the child."""
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = RunRegistry(tracking_uri=store, experiment="transferbench", artifact_location=tmp_path / "art")
    tags = {"task": "covid_geo", "backbone": "test_resnet", "family": "resnet", "weights": "random",
            "weights_label": "random-init", "random_init": "true", "seed": 0, "mode": "full"}
    child, _ = registry.child_run(study="ui-study", run_key="k", run_name="covid_geo/test_resnet/full/seed0", tags=tags)
    registry.client.set_terminated(child, "FINISHED")
    parent = registry.study_run("ui-study")
    assert registry.client.get_experiment(registry.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    with mlflow_ui(store, tmp_path) as ui, chromium() as driver:
        _open_runs(driver, ui, registry.experiment_id)
        _visible_text(driver, "ui-study")
        _close_assistant(driver)
        _expand(driver, parent)
        _visible_text(driver, "covid_geo/test_resnet/full/seed0")
        screenshot(driver, "mlflow-ui-fresh-store-runs")
        _check_run_page(driver, ui, registry.experiment_id, child,
                        registry.client.get_run(child).data.tags[NOTE_TAG])
        screenshot(driver, "mlflow-ui-fresh-store-child-run")
        assert console_errors(driver, ignore=MLFLOW_UI_NOISE) == []


def _study_store(params: dict) -> str:
    uri = STORE_ENV or params["tracking"]["tracking_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{REPO / uri.removeprefix('sqlite:///')}"
    return uri


@pytest.mark.study
def test_the_smoke_study_in_mlflow_ui(tmp_path):
    """The store ``make repro`` made: its runs table, its parent and child runs, its registered models."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    study = params["study"]["name"]
    store = _study_store(params)
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    if experiment is None:
        pytest.fail(f"no experiment {params['tracking']['experiment']!r} in {store}: run `make repro` first")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
    [parent] = client.search_runs([experiment.experiment_id], max_results=5, filter_string=(
        f"tags.`transferbench.study` = '{study}' and tags.`transferbench.kind` = 'study'"))
    children = client.search_runs([experiment.experiment_id], max_results=50, order_by=["attributes.start_time DESC"],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    finetuned = [r for r in children if r.data.tags.get("transferbench.kind") == "finetune"]
    assert finetuned, f"the study {study} has no fine-tuning runs"
    models = {m.name: m for m in client.search_registered_models(filter_string=f"name LIKE '{study}.%'")}
    assert f"{study}.covid_geo" in models, sorted(models)

    from selenium.webdriver.common.by import By

    with mlflow_ui(store, tmp_path) as ui, chromium() as driver:
        _open_runs(driver, ui, experiment.experiment_id)
        _visible_text(driver, study)
        _close_assistant(driver)
        _expand(driver, parent.info.run_id)
        _visible_text(driver, children[0].info.run_name)  # the newest child comes first
        screenshot(driver, "mlflow-ui-study-runs")
        _check_run_page(driver, ui, experiment.experiment_id, parent.info.run_id, parent.data.tags[NOTE_TAG])
        screenshot(driver, "mlflow-ui-study-parent-run")
        _check_run_page(driver, ui, experiment.experiment_id, finetuned[0].info.run_id,
                        finetuned[0].data.tags[NOTE_TAG])
        screenshot(driver, "mlflow-ui-study-child-run")

        driver.get(f"{ui}/#/models")
        for name in sorted(models):
            _visible_text(driver, name)
        screenshot(driver, "mlflow-ui-models")
        name = f"{study}.covid_geo"
        champion = client.get_model_version_by_alias(name, "champion")
        driver.get(f"{ui}/#/models/{name}")
        _visible_text(driver, name)
        for alias, version in models[name].aliases.items():  # each alias in the row of its version
            row = (By.XPATH, f"//a[normalize-space()='Version {version}']/ancestor::*[@role='row' or self::tr][1]")
            _until(driver, lambda d, row=row, alias=alias: re.search(rf"\b{re.escape(alias)}\b",
                                                                     d.find_element(*row).text),
                   f"alias {alias} is not shown beside version {version}")
        assert models[name].aliases["champion"] == champion.version
        screenshot(driver, "mlflow-ui-covid-geo-model")
        assert console_errors(driver, ignore=MLFLOW_UI_NOISE) == []
