"""Backbone catalogue and families: timm models, weights sources, the classification head."""

from transferbench.models.backbones import (
    Classifier,
    InputSpec,
    WeightsSource,
    WeightsUnavailableError,
    build_classifier,
    create_backbone,
    effective_img_size,
    presets,
)

__all__ = [
    "Classifier",
    "InputSpec",
    "WeightsSource",
    "WeightsUnavailableError",
    "build_classifier",
    "create_backbone",
    "effective_img_size",
    "presets",
]
