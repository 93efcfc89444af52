"""Classification metrics and a test-manifest evaluator, used to check models loaded back from the registry.

Metrics (scikit-learn): accuracy, balanced accuracy, macro-F1 and, for binary tasks, AUROC of the
positive (index 1) class, the same names the training stage records as ``val_<m>`` / ``test_<m>``.

Preprocessing (``eval_transform``) is deliberately minimal: RGB, resize (no crop) to the input side
the model was fine-tuned at, then the backbone's mean/std from timm's pretrained config
(``data_config``: ImageNet mean/std for most backbones, 0.5/0.5 for some). The config comes from the
timm *name*, not the module: a model loaded back from MLflow 3's default ``pt2`` format is a
``torch.export`` graph with no ``pretrained_cfg``. TODO: unify with the training engine's eval
transform so a reloaded model is scored exactly as training scored it; until then the two must be
kept in agreement by hand.

Manifests are CSVs with ``filename,label,group``; ``summary.json`` beside the manifest lists the
``classes`` in index order, and ``label`` is a class name from it (or its integer index).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm.data
import torch
from PIL import Image
from sklearn import metrics as skm
from torchvision.transforms import v2 as T

from transferbench.errors import DataError


def classification_metrics(labels: Sequence[int], probabilities: np.ndarray) -> dict[str, float]:
    """accuracy, balanced_accuracy, macro_f1 (and auroc for two classes) from class probabilities."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    n_classes = probabilities.shape[1]
    scores = {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(skm.f1_score(labels, predicted, average="macro", labels=list(range(n_classes)),
                                       zero_division=0)),
    }
    if n_classes == 2 and len(set(labels.tolist())) == 2:
        scores["auroc"] = float(skm.roc_auc_score(labels, probabilities[:, 1]))
    return scores


def data_config(model_name: str, img_size: int | None = None) -> dict[str, Any]:
    """timm's data config (input size, mean, std) of backbone ``model_name``, at ``img_size`` if given."""
    pretrained = timm.models.get_pretrained_cfg(model_name)
    if pretrained is None:
        raise DataError(f"timm has no pretrained config for model {model_name!r}")
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict())
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], img_size, img_size)
    return config


def eval_transform(config: Mapping[str, Any]) -> T.Compose:
    """Resize to the config's input side and normalise with its mean/std (see module doc)."""
    side = config["input_size"][-1]
    return T.Compose([T.ToImage(), T.Resize((side, side), antialias=True), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(mean=config["mean"], std=config["std"])])


def read_manifest(manifest: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A split manifest and its class list; labels become indices in column ``target``."""
    manifest = Path(manifest)
    summary = manifest.parent / "summary.json"
    try:
        frame = pd.read_csv(manifest, dtype={"filename": str, "label": str, "group": str})
        classes = [str(c) for c in json.loads(summary.read_text())["classes"]]
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: not found") from None
    except KeyError:
        raise DataError(f"{summary}: missing key 'classes'") from None
    missing = {"filename", "label"} - set(frame.columns)
    if missing:
        raise DataError(f"{manifest}: missing column(s) {sorted(missing)}")
    index = {name: i for i, name in enumerate(classes)}
    targets = []
    for row, label in enumerate(frame["label"], start=2):
        if label in index:
            targets.append(index[label])
        elif label.isdigit() and int(label) < len(classes):
            targets.append(int(label))
        else:
            raise DataError(f"{manifest}, row {row}: label {label!r} is not one of the classes in {summary}")
    return frame.assign(target=targets), classes


@torch.no_grad()
def evaluate_manifest(model: torch.nn.Module, manifest: str | Path, *, config: Mapping[str, Any],
                      image_root: str | Path | None = None, batch_size: int = 32) -> dict[str, float]:
    """Score ``model`` on every image of ``manifest`` (paths relative to ``image_root``, default its folder).

    ``config`` is ``data_config(timm name, fine-tuning img_size)``.
    """
    frame, classes = read_manifest(manifest)
    root = Path(image_root) if image_root is not None else Path(manifest).parent
    transform = eval_transform(config)
    try:
        model.eval()
    except NotImplementedError:  # a torch.export graph (MLflow pt2): its mode was fixed at export
        pass
    outputs = []
    for start in range(0, len(frame), batch_size):
        names = frame["filename"].iloc[start:start + batch_size]
        batch = torch.stack([transform(Image.open(root / name).convert("RGB")) for name in names])
        outputs.append(torch.softmax(model(batch).float(), dim=1))
    probabilities = torch.cat(outputs).numpy()
    if probabilities.shape[1] != len(classes):
        raise DataError(f"{manifest}: model predicts {probabilities.shape[1]} classes, the split has {len(classes)}")
    return classification_metrics(frame["target"].tolist(), probabilities)
