"""Backbone catalogue: presets driven from params.yaml, weights sources, the head."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch

from transferbench.config import BackboneSettings, load_settings
from transferbench.models import InputSpec, TaskModel, WeightsSource, build_model, create_backbone

SETTINGS = load_settings("params.yaml")
PRESETS = SETTINGS.presets()


def test_presets_cover_the_paper_and_balance_the_families():
    families = lambda names: [SETTINGS.backbone(n).family for n in names]  # noqa: E731
    assert sorted(SETTINGS.backbone(n).model.split(".")[0] for n in PRESETS["paper"]) == sorted(
        ["resnetv2_101x3_bit", "resnetv2_152x4_bit", "vit_base_patch16_224", "vit_large_patch16_224",
         "swin_base_patch4_window7_224"])
    for preset in ("small", "tiny"):
        assert families(PRESETS[preset]).count("convnet") >= 2 and families(PRESETS[preset]).count("transformer") >= 2


@pytest.mark.parametrize("name", [n for names in PRESETS.values() for n in names])
def test_every_catalogue_entry_is_a_timm_model(name):
    entry = SETTINGS.backbone(name)
    assert timm.is_model(entry.model.split(".")[0]), f"{entry.model} is not a timm model"
    if "." in entry.model:
        assert entry.model in timm.list_pretrained(entry.model.split(".")[0] + "*")


@pytest.mark.parametrize("name", PRESETS["tiny"])
def test_tiny_backbones_build_and_classify_at_the_study_size(name):
    entry = SETTINGS.backbone(name)
    head = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.LazyLinear(3))
    model = build_model(entry, img_size=SETTINGS.finetune.img_size, head=lambda n: head)
    assert model.head is head
    out = model.eval()(torch.zeros(2, 3, SETTINGS.finetune.img_size, SETTINGS.finetune.img_size))
    assert out.shape == (2, 3)
    spec = InputSpec.of(model.backbone)
    assert len(spec.mean) == 3 and spec.cache_side(64) >= 64


def test_file_weights_load_the_checkpoint_and_none_is_random(tmp_path):
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    loaded = create_backbone(BackboneSettings(model="test_resnet", family="convnet",
                                              weights=f"file:{tmp_path / 'w.pth'}"), img_size=64)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))
    random = create_backbone(BackboneSettings(model="test_resnet", family="convnet", weights="none"), img_size=64)
    assert not all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), random.state_dict().values()))
    assert WeightsSource.parse("none").label == "random-init" and WeightsSource.parse("none").random_init


def test_missing_weights_file_says_what_to_do(tmp_path):
    from transferbench.models import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="weights: none"):
        create_backbone(BackboneSettings(model="test_resnet", family="convnet", weights=f"file:{tmp_path}/x.pth"),
                        img_size=64)


def test_offline_hub_weights_fail_with_the_clear_message():
    # A real hub attempt with no network (HF_HUB_OFFLINE skips the minute of retries).
    code = ("from transferbench.config import BackboneSettings\n"
            "from transferbench.models import create_backbone\n"
            "create_backbone(BackboneSettings(model='test_resnet.r160_in1k', family='convnet', weights='hub'), "
            "img_size=64)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "WeightsUnavailableError" in proc.stderr
    assert "file:<path>" in proc.stderr and "weights: 'none'" in proc.stderr


def test_frozen_backbone_gets_no_gradient():
    model = TaskModel(timm.create_model("test_vit", num_classes=0, img_size=32), torch.nn.Linear(64, 2))
    model.train().freeze_backbone(True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert not model.backbone.training
