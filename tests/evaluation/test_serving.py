"""The registered champion serves images through real HTTP (issue #26): ``mlflow models serve`` on a loopback port.

A real fine-tune (Ray Train local mode, SQLite MLflow store) of the toy task, ``transferbench register``, then
``mlflow models serve -m models:/<study>.<task>@champion --env-manager local``. Requests carry real X-rays from the
COVID-19 mirror (PNG and JPEG, base64 in JSON), as a batch of 1 and of 4; answers are class names and probabilities
that sum to 1 and equal the engine's own prediction: the logged raw module on the engine's evaluation data path
(``build_cache`` + ``CachedImages``). The registered model is safe: no pickle among its artifacts, weights read by
safetensors. ``test_the_smoke_study_champion_serves`` runs the same request against the registry ``make repro``
made (marker ``study``, run by .ci/run after the study).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from engine.conftest import toy_params, toy_splits  # noqa: F401
from transferbench.config import Settings, TaskSettings, build
from transferbench.engine.data import CachedImages, TaskManifests, build_cache
from transferbench.engine.serving import IMAGE_COLUMN, ServingError
from transferbench.engine.tasks import kind_for_task
from transferbench.stages.finetune import run_finetune

REPO = Path(__file__).resolve().parents[2]
MIRROR = Path(os.environ.get("TRANSFERBENCH_DATA_MIRROR", REPO.parent / "shared" / "datasets")) / "covid-chestxray"
BACKBONE = "test_resnet"


def covid_images() -> list[Path]:
    """Two PNG and two JPEG X-rays of the mirror (the first of each, in name order)."""
    images = sorted((MIRROR / "images").iterdir()) if (MIRROR / "images").is_dir() else []
    pngs = [p for p in images if p.suffix.lower() == ".png"][:2]
    jpegs = [p for p in images if p.suffix.lower() in (".jpg", ".jpeg")][:2]
    if len(pngs) < 2 or len(jpegs) < 2:
        pytest.skip(f"the COVID-19 mirror is not at {MIRROR} (set TRANSFERBENCH_DATA_MIRROR)")
    return [pngs[0], jpegs[0], pngs[1], jpegs[1]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, cwd: Path) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on a free loopback port; yields its base URL."""
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # the environment's uvicorn, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (cwd / f"serve-{port}.log").open("w")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise AssertionError(f"mlflow models serve exited {server.returncode}: "
                                     f"{(cwd / f'serve-{port}.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def invoke(url: str, images: list[Path]) -> list[dict]:
    """POST the images as base64 in a ``dataframe_split`` JSON request; the response's predictions."""
    body = {"dataframe_split": {"columns": [IMAGE_COLUMN],
                                "data": [[base64.b64encode(p.read_bytes()).decode()] for p in images]}}
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())["predictions"]


def engine_probabilities(run_id: str, images: list[Path], tmp: Path) -> np.ndarray:
    """The engine's own prediction: the run's raw module (``model``) on the evaluation data path (``build_cache``,
    ``CachedImages``: the cache side, the centre crop, timm's normalisation), with the run's recorded inputs."""
    import mlflow.pytorch

    spec = mlflow.pyfunc.load_model(f"runs:/{run_id}/serving").unwrap_python_model().served
    manifest = tmp / "manifests" / "test.csv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    classes = spec["summary"]["classes"]
    pd.DataFrame({"filename": [str(p) for p in images], "label": classes[0], "group": "g"}).to_csv(manifest,
                                                                                                 index=False)
    kind = kind_for_task(TaskSettings.model_validate_json(json.dumps(spec["task_settings"])), spec["summary"])
    cache = build_cache(TaskManifests("served", {"test": manifest}, spec["summary"]), "test", kind=kind,
                        side=spec["cache_side"], cache_dir=tmp / "cache")
    data = CachedImages(cache, img_size=spec["img_size"], mean=spec["mean"], std=spec["std"], train=False)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()
    with torch.no_grad():
        logits = model(torch.stack([data[i][0] for i in range(len(data))]))
    return torch.softmax(logits.double(), dim=1).numpy()


def check_answers(predictions: list[dict], expected: np.ndarray, classes: list[str]) -> None:
    assert len(predictions) == len(expected)
    for answer, p in zip(predictions, expected, strict=True):
        assert list(answer["probabilities"]) == classes  # the task's class order
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert [answer["probabilities"][c] for c in classes] == pytest.approx(p.tolist(), abs=1e-5)
        assert answer["label"] == classes[int(p.argmax())] and answer["probability"] == pytest.approx(p.max())


@pytest.fixture(scope="module")
def champion(toy_splits, tmp_path_factory) -> tuple[Settings, str, str, Path]:  # noqa: F811
    """(settings, tracking URI, champion's run id, working dir): a real fine-tune, registered."""
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    raw = toy_params(toy_splits, data={"reports_dir": str(root / "reports")},
                     ray={"storage_path": str(root / "ray_results")},
                     tracking={"tracking_uri": uri, "artifact_location": str(root / "mlartifacts")},
                     compare={"metrics_dir": str(root / "metrics")})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    settings = build(Settings, raw)
    result = run_finetune(settings, task="toy", backbone=BACKBONE, seed=0, mode="full",
                            metrics_dir=root / "metrics", plots_dir=root / "plots")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-m", "transferbench.cli", "--params", str(root / "params.yaml"),
                           "register"], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr
    return settings, uri, result["mlflow_run_id"], root


@pytest.fixture
def store(champion):
    """``champion``, with its store as this test's MLflow tracking and registry URI (reset after each test)."""
    mlflow.set_tracking_uri(champion[1])
    mlflow.set_registry_uri(champion[1])
    return champion


@pytest.mark.slow
def test_the_champion_serves_xrays_over_http_as_the_engine_predicts(store, tmp_path):
    settings, uri, run_id, root = store
    images = covid_images()
    expected = engine_probabilities(run_id, images, tmp_path)
    classes = ["bright", "dark"]
    with served("models:/toy-study.toy@champion", uri, root) as url:
        check_answers(invoke(url, images[:1]), expected[:1], classes)  # batch of 1: the example fixes no size
        check_answers(invoke(url, images), expected, classes)  # batch of 4, PNG and JPEG
        bad = {"dataframe_split": {"columns": [IMAGE_COLUMN], "data": [[base64.b64encode(b"not an image").decode()]]}}
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps(bad).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=60)
        assert error.value.code == 400 and "image 0: cannot decode" in error.value.read().decode()


@pytest.mark.slow
def test_the_registered_model_is_safe_and_reads_arrays_and_16_bit_xrays(store, tmp_path):
    from safetensors import safe_open

    settings, uri, run_id, _ = store
    local = Path(mlflow.artifacts.download_artifacts("models:/toy-study.toy@champion", dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {"MLmodel", "artifacts/weights.safetensors", "artifacts/serving.json", "serving_entry.py"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))], files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code: no pickled object
    assert "python_model" not in flavor
    with safe_open(str(local / "artifacts" / "weights.safetensors"), framework="pt") as weights:
        assert any(key.startswith("backbone.") for key in weights.keys())

    model = mlflow.pyfunc.load_model(str(local))  # from the downloaded artifacts alone
    assert model.metadata.signature.inputs.input_names() == [IMAGE_COLUMN]
    images = covid_images()[:2]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in images]  # uint8 H x W x 3
    answers = model.predict(pd.DataFrame({IMAGE_COLUMN: arrays}))
    check_answers(answers.to_dict("records"), engine_probabilities(run_id, images, tmp_path), ["bright", "dark"])

    gray = np.asarray(Image.open(images[0]).convert("L")).astype(np.uint16) * 257  # the same X-ray in 16 bit
    png16 = tmp_path / "xray16.png"
    Image.fromarray(gray).save(png16)
    assert Image.open(png16).mode.startswith("I")
    as16 = model.predict(pd.DataFrame({IMAGE_COLUMN: [png16.read_bytes(), gray]}))
    as8 = model.predict(pd.DataFrame({IMAGE_COLUMN: [np.asarray(Image.open(images[0]).convert("L"))]}))
    for row in as16.to_dict("records"):  # rescaled by its maximum, as the training cache does
        assert row["probability"] == pytest.approx(as8.iloc[0]["probability"], abs=0.02)
    with pytest.raises(ServingError, match="image 1: an array must be uint8 or uint16"):
        model.predict(pd.DataFrame({IMAGE_COLUMN: [arrays[0], arrays[0].astype(np.float32)]}))


@pytest.mark.study
def test_the_smoke_study_champion_serves(tmp_path):
    """The registry ``make repro`` made: its covid_geo champion answers real X-rays over HTTP."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params["tracking"]["tracking_uri"]
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{REPO / uri.removeprefix('sqlite:///')}"
    name = f"{params['study']['name']}.covid_geo"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        pytest.fail(f"no {name}@champion in {uri}: run `make repro` first")
    classes = json.loads(Path(REPO / params["data"]["splits_dir"] / "covid_geo" / "summary.json").read_text())[
        "classes"]
    images = covid_images()
    with served(f"models:/{name}@champion", uri, tmp_path) as url:
        answers = invoke(url, images)
    assert len(answers) == len(images)
    for answer in answers:
        assert list(answer["probabilities"]) == classes and answer["label"] in classes
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    mlflow.set_tracking_uri(uri)
    try:
        expected = engine_probabilities(champion.run_id, images, tmp_path)
    finally:
        mlflow.set_tracking_uri(None)
    check_answers(answers, expected, classes)
