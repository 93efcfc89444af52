"""``transferbench ui``: ``mlflow ui`` on the study's store, its link opening the training runs (docs/finetuning.md).

The slow test runs the command as the console script (SIGTERM stops it like Ctrl-C) and opens the URL it prints in
headless Chromium (tests/browser.py); the server must answer until then and be gone after.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from browser import chromium, console_errors, screenshot
from test_mlflow_ui import MLFLOW_UI_NOISE, _close_assistant, _until, _visible_text
from transferbench.cli import main
from transferbench.engine.cluster import free_port
from transferbench.engine.tracking import RunRegistry, experiment_ui_url

ROOT = Path(__file__).resolve().parents[1]
TRANSFERBENCH = Path(sys.executable).with_name("transferbench")


def _params(tmp_path: Path, store: Path) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["tracking_uri"] = f"sqlite:///{store}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def test_ui_without_a_store_names_the_missing_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "mlflow" / "missing.db"
    params = _params(tmp_path, missing)
    assert main(["--params", str(params), "ui", "--port", str(free_port()), "--no-browser"]) == 2
    assert f"{missing}: no MLflow store there yet" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.slow  # ~20 s: mlflow ui's start and the UI's first page
def test_ui_serves_the_study_runs_until_sigterm(tmp_path: Path) -> None:
    store = tmp_path / "mlruns.db"
    registry = RunRegistry(tracking_uri=f"sqlite:///{store}", experiment="transferbench",
                           artifact_location=tmp_path / "art")
    tags = {"task": "covid_geo", "backbone": "test_resnet", "family": "resnet", "weights": "random",
            "weights_label": "random-init", "random_init": "true", "seed": 0, "mode": "full"}
    child, _ = registry.child_run(study="ui-study", run_key="k", run_name="covid_geo/test_resnet/full/seed0", tags=tags)
    registry.client.set_terminated(child, "FINISHED")
    registry.study_run("ui-study")
    params = _params(tmp_path, store)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.err"
    with log.open("w") as err:
        command = subprocess.Popen([str(TRANSFERBENCH), "--params", str(params), "ui", "--port", str(port),
                                    "--no-browser"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("MLflow UI: "):
            line = command.stdout.readline()
            assert line, f"transferbench ui exited ({command.wait()}) before its URL:\n{log.read_text()[-3000:]}"
            lines.append(line)
        link = lines[-1].removeprefix("MLflow UI: ").strip()
        assert link == experiment_ui_url(ui, registry.experiment_id), lines

        with chromium() as driver:
            driver.get(link)
            _visible_text(driver, "ui-study")
            _until(driver, lambda d: "/runs" in d.current_url and "workflowType=machine_learning" in d.current_url,
                   "the experiment page did not stay on the training runs")
            _close_assistant(driver)
            screenshot(driver, "transferbench-ui-runs")
            assert console_errors(driver, ignore=MLFLOW_UI_NOISE) == []

        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=30) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if command.poll() is None:
            command.terminate()
            command.wait(timeout=30)
    with pytest.raises(OSError):  # the server went with it
        urllib.request.urlopen(f"{ui}/health", timeout=5)
    server_log = re.search(r"\(server log (.+?)\); Ctrl-C stops it", log.read_text())
    assert server_log, log.read_text()
    assert not Path(server_log[1]).exists()  # a clean stop removes it
