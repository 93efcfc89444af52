"""The served model: an MLflow pyfunc that takes images and returns the task's answer, in a safe format.

What a fine-tune logs as ``serving`` (and what ``transferbench register`` registers), beside the raw
``mlflow.pytorch`` module logged as ``model``:

- **Format, no pickle.** MLflow "models from code": the pyfunc is ``serving_entry.py`` (this package's
  code, run by MLflow at load time) and two artifacts: ``weights.safetensors``, the fine-tuned model's state
  dict, and ``serving.json``, what rebuilds it: the task's settings and label space (its split summary), the
  catalogue entry, the protocol, the input size and timm's normalisation. Loading rebuilds the architecture
  with the installed ``transferbench`` (no pretrained weights are fetched: the file holds them all) and
  reads the tensors with ``safetensors``, so nothing is unpickled and nothing outside the model's
  artifacts is read.
- **Input.** A DataFrame (or JSON ``dataframe_split``/``dataframe_records``) with one column ``image``:
  encoded image bytes (PNG, JPEG, 16-bit PNG ...; base64 in JSON, which the signature's ``binary`` type
  decodes), or, in Python, uint8/uint16 arrays H x W (grayscale) or H x W x C (RGB/RGBA). Each goes
  through the engine's own evaluation path: ``engine.data.load_rgb`` (16-bit rescaled, grayscale made RGB,
  centre square resized to the cache side) then ``engine.data.eval_transform`` (centre crop, timm's
  mean/std), so a served image is scored exactly as the test split was.
- **Output.** One row per image: the task kind's ``answers`` -- for classification the class name, its
  probability and every class's probability in the task's class order; an age in years; a mask or a
  depth map; per component for a multi-task model.

``mlflow.pyfunc.load_model(uri).unwrap_python_model().model`` is the rebuilt ``torch.nn.Module``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

if TYPE_CHECKING:
    import torch

    from transferbench.config import BackboneSettings, FinetuneSettings, TaskSettings
    from transferbench.engine.tasks import TaskKind
    from transferbench.models import InputSpec

SERVING_ARTIFACT = "serving"  # the logged model's name in a run: what the registry registers
IMAGE_COLUMN = "image"
FORMAT_VERSION = 1
ENTRY = Path(__file__).with_name("serving_entry.py")


class ServingError(MlflowException):
    """An input the served model cannot read; names the image's row (the scoring server answers 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def served_spec(*, task: str, task_settings: TaskSettings, summary: Mapping[str, Any], backbone_name: str,
                backbone: BackboneSettings, protocol: FinetuneSettings, seed: int, img_size: int,
                input_spec: InputSpec) -> dict[str, Any]:
    """``serving.json``: everything that rebuilds one run's model and its input pipeline, as plain JSON."""
    return {
        "format": FORMAT_VERSION, "task": task, "kind": task_settings.kind,
        "task_settings": task_settings.model_dump(mode="json"), "summary": dict(summary),
        "backbone_name": backbone_name, "backbone": backbone.model_dump(mode="json"),
        "protocol": protocol.model_dump(mode="json"), "seed": seed, "img_size": img_size,
        "cache_side": input_spec.cache_side(img_size), "mean": list(input_spec.mean), "std": list(input_spec.std),
        "weights": backbone.weights, "random_init": backbone.weights == "none",
    }


def build_served(served: Mapping[str, Any]) -> tuple[TaskKind, torch.nn.Module]:
    """The task kind and the model (random weights, in eval mode) that ``serving.json`` describes."""
    from transferbench.config import BackboneSettings, FinetuneSettings, TaskSettings
    from transferbench.engine.tasks import kind_for_task
    from transferbench.models import build_model

    if served.get("format") != FORMAT_VERSION:
        raise ServingError(f"serving.json format {served.get('format')!r}: this transferbench reads format "
                           f"{FORMAT_VERSION}; load the model with the transferbench version that logged it")
    # JSON validation: the settings' strict types take JSON arrays for tuples
    kind = kind_for_task(TaskSettings.model_validate_json(json.dumps(served["task_settings"])), served["summary"])
    protocol = FinetuneSettings.model_validate_json(json.dumps(served["protocol"]))
    # the architecture only: the weights file holds every tensor, so nothing is fetched or read from disk
    backbone = BackboneSettings.model_validate_json(json.dumps({**served["backbone"], "weights": "none"}))
    model = build_model(backbone, img_size=served["img_size"], head=lambda n: kind.head(n, protocol),
                        features=kind.features)
    return kind, model.eval()


def _decode(value: Any, row: int, side: int) -> torch.Tensor:
    """One cell of the ``image`` column as the cache would hold it: uint8 (3, side, side)."""
    from PIL import Image, UnidentifiedImageError

    from transferbench.engine.data import load_rgb

    if isinstance(value, str):  # base64 text, when a caller bypasses the signature's decoding
        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ServingError(f"image {row}: a string that is not base64-encoded image bytes") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return load_rgb(io.BytesIO(bytes(value)), side)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ServingError(f"image {row}: cannot decode the image bytes ({exc})") from None
    if isinstance(value, np.ndarray):
        ok_shape = value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4))
        if value.dtype not in (np.uint8, np.uint16) or not ok_shape:
            raise ServingError(f"image {row}: an array must be uint8 or uint16, H x W or H x W x 1/3/4 "
                               f"(channels last); got {value.dtype} {value.shape}")
        if value.ndim == 3 and value.shape[2] == 1:
            value = value[:, :, 0]
        if value.dtype == np.uint16 and value.ndim == 3:
            raise ServingError(f"image {row}: 16-bit images must be grayscale (H x W), got {value.shape}")
        return load_rgb(Image.fromarray(np.ascontiguousarray(value)), side)
    raise ServingError(f"image {row}: expected encoded image bytes or a uint8 array, got {type(value).__name__}")


class ImageModel(mlflow.pyfunc.PythonModel):
    """Images -> the task's answers (see the module docstring). Built by ``serving_entry.py``, never pickled."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from safetensors.torch import load_model

        from transferbench.engine.data import eval_transform

        self.served = json.loads(Path(context.artifacts["spec"]).read_text())
        self.kind, self.model = build_served(self.served)
        load_model(self.model, context.artifacts["weights"], strict=True)
        self.transform = eval_transform(self.served["img_size"], self.served["mean"], self.served["std"])

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input:
            raise ServingError(f"expected a table with an {IMAGE_COLUMN!r} column (encoded image bytes, base64 in "
                               f"JSON, or uint8 arrays), got {type(model_input).__name__}")
        side = self.served["cache_side"]
        images = [_decode(value, row, side) for row, value in enumerate(model_input[IMAGE_COLUMN])]
        if not images:
            return pd.DataFrame()
        batch = torch.stack([self.transform(image) for image in images])
        with torch.inference_mode():
            outputs = self.model(batch)
        return pd.DataFrame(self.kind.answers(outputs))


def example_png(image: np.ndarray) -> bytes:
    """A uint8 (3, H, W) image as PNG bytes (the logged input example)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.transpose(image, (1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def log_serving_model(model: torch.nn.Module, served: Mapping[str, Any], example: bytes,
                      pip_requirements: list[str]) -> str:
    """Log ``model`` as the ``serving`` pyfunc of the active MLflow run; returns its model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from safetensors.torch import save_model

    signature = ModelSignature(inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]))
    with tempfile.TemporaryDirectory() as tmp:
        weights, spec = Path(tmp) / "weights.safetensors", Path(tmp) / "serving.json"
        save_model(model, str(weights))
        spec.write_text(json.dumps(served, indent=2))
        info = mlflow.pyfunc.log_model(
            name=SERVING_ARTIFACT, python_model=str(ENTRY), artifacts={"weights": str(weights), "spec": str(spec)},
            signature=signature, input_example=pd.DataFrame({IMAGE_COLUMN: [example]}),
            pip_requirements=pip_requirements)
    return info.model_uri
