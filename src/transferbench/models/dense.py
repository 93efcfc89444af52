"""Multi-scale backbone features and the UPerNet decoder of segmentation-models-pytorch (PROTOCOL.md, "Dense tasks").

A dense task kind's head reads the backbone's feature pyramid, in smp's encoder layout: a list
``[input, stride 2, stride 4, stride 8, stride 16, stride 32]`` with ``out_channels`` per level
(0 channels where the backbone has no such level, as smp does for transformer-style models).

- ConvNets and Swin-style models: smp's ``TimmUniversalEncoder`` (timm ``features_only``), with the
  catalogue entry's weights (hub, ``file:``, or none).
- Plain ViTs (one stride, the patch size): smp refuses them ("Unsupported model downsampling
  pattern"). ``ViTPyramid`` takes the tokens after four evenly spaced blocks and resamples them to
  strides 4/8/16/32, as the ViT + UPerNet set-ups of BEiT and MAE do: two 2x transposed convolutions
  (with BatchNorm and GELU between them), one, none, and a 2x max-pool.

``UPerNetHead`` is smp's ``UPerNetDecoder`` (PSP on the last level, FPN over the others, fused at
stride 4) and its ``SegmentationHead`` (a 1x1 convolution, bilinear upsampling x4 to the input size),
initialised as smp initialises them. Nothing of the decoder is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F

from transferbench.config import BackboneSettings
from transferbench.models.backbones import create_backbone, with_weights

PYRAMID_STRIDES = (4, 8, 16, 32)  # what UPerNet fuses (smp's levels 2..5)
VIT_PATCH = 16  # strides 4..32 from a stride-16 token grid


class ViTPyramid(nn.Module):
    """A plain ViT's tokens after four evenly spaced blocks, resampled to strides 4/8/16/32 (BEiT/MAE's UPerNet)."""

    def __init__(self, vit: nn.Module, *, indices: Sequence[int] | None = None) -> None:
        super().__init__()
        patch = tuple(getattr(vit.patch_embed, "patch_size", (0, 0)))
        if patch != (VIT_PATCH, VIT_PATCH):
            raise ValueError(f"ViTPyramid needs a {VIT_PATCH}x{VIT_PATCH} patch (strides 4..32 from 16), "
                             f"got {patch}")
        depth, dim = len(vit.blocks), vit.embed_dim
        # evenly spaced, ending at the last block: 12 blocks -> 2, 5, 8, 11 (0-based), as ViTDet takes them
        self.indices = tuple(indices) if indices is not None else tuple(depth * (i + 1) // 4 - 1 for i in range(4))
        self.vit = vit
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)
        self.out_channels = [3, 0, dim, dim, dim, dim]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return self.vit.pretrained_cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = self.vit.forward_intermediates(x, indices=list(self.indices), output_fmt="NCHW",
                                                intermediates_only=True)
        levels = [f(t) for f, t in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), tokens, strict=True)]
        b, _, h, w = x.shape
        return [x, x.new_empty(b, 0, h // 2, w // 2), *levels]


class TimmPyramid(nn.Module):
    """smp's ``TimmUniversalEncoder``, with the timm model's ``pretrained_cfg`` (its mean/std) exposed."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_channels = list(encoder.out_channels)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.encoder.model, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(x)


def _universal(model: str, *, pretrained: bool, img_size: int, overlay: dict[str, Any] | None) -> nn.Module:
    from segmentation_models_pytorch.encoders import TimmUniversalEncoder

    kwargs: dict[str, Any] = {"pretrained_cfg_overlay": overlay} if overlay else {}
    try:  # transformers (Swin) take the input size; ConvNets accept any
        return TimmUniversalEncoder(model, pretrained=pretrained, depth=5, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return TimmUniversalEncoder(model, pretrained=pretrained, depth=5, **kwargs)


def _is_plain_vit(model: str) -> bool:
    with torch.device("meta"):
        probe = timm.create_model(model, pretrained=False)
    return hasattr(probe, "forward_intermediates") and hasattr(probe, "blocks") and hasattr(probe, "patch_embed") \
        and not hasattr(probe, "layers")  # Swin has layers (stages) and gives its own pyramid


def create_pyramid(backbone: BackboneSettings, *, img_size: int) -> nn.Module:
    """The catalogue entry's feature pyramid (smp's encoder layout), with its declared weights."""
    if _is_plain_vit(backbone.model):
        return ViTPyramid(create_backbone(backbone, img_size=img_size))
    return TimmPyramid(with_weights(backbone, lambda **weights: _universal(backbone.model, img_size=img_size,
                                                                           **weights)))


class UPerNetHead(nn.Module):
    """smp's UPerNet decoder and segmentation head on a feature pyramid: ``out_channels`` maps at the input size,
    passed through ``activation`` (e.g. depth's positive range) if given."""

    def __init__(self, encoder_channels: Sequence[int], out_channels: int, *, decoder_channels: int = 256,
                 activation: nn.Module | None = None) -> None:
        from segmentation_models_pytorch.base import SegmentationHead
        from segmentation_models_pytorch.base.initialization import initialize_decoder, initialize_head
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

        super().__init__()
        self.decoder = UPerNetDecoder(encoder_channels=list(encoder_channels), encoder_depth=5,
                                      decoder_channels=decoder_channels)
        self.head = SegmentationHead(decoder_channels, out_channels, kernel_size=1, upsampling=PYRAMID_STRIDES[0])
        self.activation = activation or nn.Identity()
        initialize_decoder(self.decoder)
        initialize_head(self.head)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        out = self.head(self.decoder(list(features)))
        size = features[0].shape[-2:]  # the input: exact size even when it is not a multiple of 32
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return self.activation(out)


class PooledLast(nn.Module):
    """Global average pooling of a pyramid's last (stride-32) level, then ``head``: a classification head on the
    last-stage features of a dense backbone (PROTOCOL.md, segmentation + Indoor67 / WikiArt)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.head(features[-1].mean(dim=(2, 3)))
