"""Backbone catalogue -> timm models, with a task kind's head on their pooled features.

PROTOCOL.md, "Backbones": a timm backbone (features only, ``num_classes=0``: the model's own
pooling, global average for ConvNets and Swin, the class token for ViT) followed by the head the
task kind builds (dropout + linear for classification). The weights source of every entry is
explicit:

- ``hub``: timm's pretrained weights (downloaded through the Hugging Face hub);
  when that is impossible (offline) loading fails with a ``WeightsUnavailableError``
  that says to use ``file:<path>`` or ``none`` -- never a silent random init.
- ``file:<path>``: a local checkpoint (e.g. tracked by DVC), loaded by timm through
  ``pretrained_cfg_overlay=dict(file=...)``.
- ``none``: random initialisation; results are labelled ``random_init`` everywhere.

Input normalisation (mean/std, crop fraction) comes from
``timm.data.resolve_model_data_config``, never from params.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from transferbench.config import BackboneSettings
from transferbench.errors import TransferbenchError


class WeightsUnavailableError(TransferbenchError):
    """Pretrained weights were asked for but cannot be loaded (offline hub, missing file)."""


@dataclass(frozen=True)
class WeightsSource:
    """A parsed ``weights:`` value."""

    kind: str  # "hub" | "file" | "none"
    path: Path | None = None

    @classmethod
    def parse(cls, value: str) -> WeightsSource:
        if value == "hub":
            return cls("hub")
        if value == "none":
            return cls("none")
        if value.startswith("file:") and len(value) > 5:
            return cls("file", Path(value[5:]))
        raise TransferbenchError(f"weights {value!r}: expected 'hub', 'none' or 'file:<path>'")

    @property
    def random_init(self) -> bool:
        return self.kind == "none"

    @property
    def label(self) -> str:
        """What reports print next to a result: pretrained source or 'random-init'."""
        return "random-init" if self.random_init else ("hub-pretrained" if self.kind == "hub" else "file-pretrained")

    @property
    def description(self) -> str:
        """The long form for tables and plots, e.g. 'none (random init)'."""
        if self.kind == "file":
            return f"file:{self.path} (local checkpoint)"
        return "hub (timm pretrained)" if self.kind == "hub" else "none (random init)"


def effective_img_size(backbone: BackboneSettings, protocol_img_size: int) -> int:
    """The catalogue's per-backbone input size, else the protocol's ``finetune.img_size``."""
    return backbone.img_size or protocol_img_size


def _create(model: str, *, pretrained: bool, img_size: int, overlay: Mapping[str, Any] | None) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": 0}
    if overlay:
        kwargs["pretrained_cfg_overlay"] = dict(overlay)
    try:
        # Transformers take the input size (position embeddings are resized to it).
        return timm.create_model(model, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(model, **kwargs)  # ConvNets accept any input size


def with_weights(backbone: BackboneSettings, create: Callable[..., nn.Module]) -> nn.Module:
    """``create(pretrained=..., overlay=...)`` with the catalogue entry's declared weights: random init (``none``),
    a local checkpoint (``file:``, timm's ``pretrained_cfg_overlay``) or the hub, failing clearly when they cannot
    be had (never a silent random init)."""
    source = WeightsSource.parse(backbone.weights)
    if source.kind == "none":
        return create(pretrained=False, overlay=None)
    if source.kind == "file":
        path = source.path.expanduser().resolve()
        if not path.is_file():
            raise WeightsUnavailableError(
                f"backbone {backbone.model!r}: weights file {path} does not exist "
                f"(weights: {backbone.weights}); `dvc pull` it, or use weights: none for random init")
        return create(pretrained=True, overlay={"file": str(path)})
    try:
        return create(pretrained=True, overlay=None)
    except (OSError, RuntimeError, ValueError) as exc:  # hub errors subclass OSError/ValueError
        raise WeightsUnavailableError(
            f"backbone {backbone.model!r}: cannot load timm hub weights (weights: hub): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Without internet use weights: 'file:<path>' (a local checkpoint, e.g. tracked by DVC) "
            f"or weights: 'none' (random initialisation, reported as random-init)") from exc


def create_backbone(backbone: BackboneSettings, *, img_size: int) -> nn.Module:
    """The timm feature extractor for one catalogue entry, with its declared weights."""
    return with_weights(backbone, lambda **weights: _create(backbone.model, img_size=img_size, **weights))


@dataclass(frozen=True)
class InputSpec:
    """Normalisation and crop fraction as timm resolves them for a model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float

    @classmethod
    def of(cls, model: nn.Module) -> InputSpec:
        cfg = timm.data.resolve_model_data_config(model)
        return cls(tuple(cfg["mean"]), tuple(cfg["std"]), float(cfg.get("crop_pct") or 0.875))

    def cache_side(self, img_size: int) -> int:
        """Side of the cached image from which training crops ``img_size`` (224 -> 256 at 0.875)."""
        return max(img_size, round(img_size / self.crop_pct))
