"""UPerNet (segmentation-models-pytorch's decoder) on the feature pyramids of a ConvNet, a Swin-style model and a
plain ViT (issue #22): forward and backward, gradients into the backbone, and the ViT adapter's strides."""

from __future__ import annotations

import pytest
import timm
import torch

from transferbench.config import BackboneSettings
from transferbench.models import build_model
from transferbench.models.dense import PooledLast, TimmPyramid, UPerNetHead, ViTPyramid, create_pyramid


def _train_step(model: torch.nn.Module, size: int, classes: int) -> torch.Tensor:
    images = torch.randn(2, 3, size, size)
    logits = model(images)
    assert logits.shape == (2, classes, size, size)  # one map per class, at the input size
    torch.nn.functional.cross_entropy(logits, torch.randint(0, classes, (2, size, size))).backward()
    return logits


def _backbone_gets_gradients(backbone: torch.nn.Module) -> None:
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:3]) and any(float(g.abs().sum()) > 0 for g in grads if
                                                                   g is not None)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_upernet_trains_on_a_convnet_and_on_a_plain_vit(name):
    torch.manual_seed(0)
    model = build_model(BackboneSettings(model=name, family="convnet", weights="none"), img_size=64,
                        head=lambda channels: UPerNetHead(channels, 5, decoder_channels=16), features="pyramid")
    assert isinstance(model.backbone, ViTPyramid if name == "test_vit" else TimmPyramid)
    _train_step(model, 64, 5)
    _backbone_gets_gradients(model.backbone)
    assert timm.data.resolve_model_data_config(model.backbone)["mean"]  # timm's mean/std still resolve


def test_upernet_trains_on_a_swin_style_pyramid():
    from segmentation_models_pytorch.encoders import TimmUniversalEncoder

    torch.manual_seed(0)
    swin = TimmPyramid(TimmUniversalEncoder("swin_tiny_patch4_window7_224", pretrained=False, depth=5, img_size=64,
                                            embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2))
    assert swin.out_channels == [3, 0, 16, 32, 64, 128]  # strides 4..32, no stride-2 level (smp's layout)
    head = UPerNetHead(swin.out_channels, 3, decoder_channels=16)
    model = torch.nn.Sequential(swin, head)
    _train_step(model, 64, 3)
    _backbone_gets_gradients(swin)


def test_the_vit_adapter_takes_four_evenly_spaced_blocks_at_strides_4_to_32():
    vit = timm.create_model("test_vit2", num_classes=0, img_size=64)  # 8 blocks
    pyramid = ViTPyramid(vit)
    assert pyramid.indices == (1, 3, 5, 7)
    features = pyramid(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert [f.shape[1] for f in features] == pyramid.out_channels == [3, 0, 64, 64, 64, 64]
    with pytest.raises(ValueError, match="16x16 patch"):
        ViTPyramid(timm.create_model("vit_tiny_patch16_224", num_classes=0, patch_size=8, img_size=64, depth=1))


def test_a_pooled_head_on_a_pyramid_reads_its_last_level():
    pyramid = create_pyramid(BackboneSettings(model="test_resnet", family="convnet", weights="none"), img_size=64)
    head = PooledLast(torch.nn.Linear(pyramid.out_channels[-1], 7))
    assert head(pyramid(torch.randn(2, 3, 64, 64))).shape == (2, 7)
