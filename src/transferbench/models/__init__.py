"""Backbone catalogue and families: timm models, weights sources, the model a task kind's head completes."""

from transferbench.models.backbones import (
    InputSpec,
    WeightsSource,
    WeightsUnavailableError,
    create_backbone,
    effective_img_size,
)
from transferbench.models.task_model import TaskModel, build_model

__all__ = [
    "InputSpec",
    "TaskModel",
    "WeightsSource",
    "WeightsUnavailableError",
    "build_model",
    "create_backbone",
    "effective_img_size",
]
