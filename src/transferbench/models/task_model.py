"""A backbone and the head a task kind puts on it, with a freezable backbone (PROTOCOL.md, "Backbones").

The backbone is the catalogue entry's timm model: its pooled features (``models.backbones``) for heads on
one vector, or its feature pyramid (``models.dense``) for dense heads such as UPerNet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from transferbench.config import BackboneSettings
from transferbench.models.backbones import create_backbone
from transferbench.models.dense import create_pyramid


class TaskModel(nn.Module):
    """Backbone features -> the task kind's head, with a freezable backbone.

    ``backbone_frozen`` runs the backbone in eval mode under ``torch.no_grad`` (warm-up,
    linear probe): its parameters get no gradients and its BatchNorm statistics stay put.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = False

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        self.backbone.train(self.training and not frozen)

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        self.backbone.train(mode and not self.backbone_frozen)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.backbone(images)
        else:
            features = self.backbone(images)
        return self.head(features)


def build_model(backbone: BackboneSettings, *, img_size: int, head: Callable[[Any], nn.Module],
                features: str = "pooled") -> TaskModel:
    """The catalogue entry's backbone (built first: the seeded initialisation order), then its head.

    ``features``: "pooled" (the backbone's pooled features; ``head(num_features)``) or "pyramid" (its
    multi-scale features, ``models.dense``; ``head(out_channels)``, one entry per level).
    """
    if features == "pyramid":
        pyramid = create_pyramid(backbone, img_size=img_size)
        return TaskModel(pyramid, head(pyramid.out_channels))
    pooled = create_backbone(backbone, img_size=img_size)
    return TaskModel(pooled, head(pooled.num_features))
