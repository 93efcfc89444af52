"""Sensitivity params: bad ranges fail at load naming the key; the tuned switch picks per-backbone values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferbench.cli import main
from transferbench.config import ConfigError, Settings, build, load_settings

from .conftest import sensitivity_params

SHIPPED = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", {"low": 1e-2, "high": 1e-6, "log": True}, "params key 'sensitivity.space.lr': low 0.01 > high 1e-06"),
    ("warmup_lr", {"low": 0.0, "high": 1e-4, "log": True},
     "params key 'sensitivity.space.warmup_lr': low 0.0 must be > 0 on a log scale"),
    ("lr", {"low": -1e-3, "high": 1e-2, "log": False}, "params key 'sensitivity.space.lr': low -0.001 must be > 0"),
    ("warmup_iters", {"low": 50, "high": 10}, "params key 'sensitivity.space.warmup_iters': low 50 > high 10"),
])
def test_bad_ranges_fail_at_load_naming_the_key(tmp_path: Path, key: str, value: dict, message: str) -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["sensitivity"]["space"][key] = value
    with pytest.raises(ConfigError) as err:
        build(Settings, raw)
    assert str(err.value).startswith(message)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(params), "check-params"]) == 2


def test_shipped_sensitivity_section_loads() -> None:
    s = load_settings(SHIPPED).sensitivity
    assert s.tasks and s.backbones and s.n_trials >= 12 and s.sampler == "qmc"
    assert s.space.lr.log and s.space.lr.low < s.space.lr.high


def test_unknown_sensitivity_backbone_is_rejected(tmp_path: Path) -> None:
    raw = sensitivity_params(tmp_path, tmp_path, backbones=["test_resnet", "resnet999"])
    with pytest.raises(ConfigError, match="sensitivity.backbones"):
        build(Settings, raw)


def test_tuned_switch_uses_the_backbones_tuned_values(tmp_path: Path) -> None:
    raw = sensitivity_params(tmp_path, tmp_path)
    raw["finetune"]["hyperparameters"] = "tuned"
    with pytest.raises(ConfigError, match=r"params key 'backbones\.test_resnet\.tuned': missing"):
        build(Settings, raw)
    raw["backbones"]["test_resnet"]["tuned"] = {"lr": 3e-3, "warmup_iters": 0, "warmup_lr": 1e-7}
    settings = build(Settings, raw)
    protocol = settings.finetune_for("test_resnet")
    assert (protocol.lr, protocol.warmup_iters, protocol.warmup_lr) == (3e-3, 0, 1e-7)
    raw["finetune"]["hyperparameters"] = "paper"
    assert build(Settings, raw).finetune_for("test_resnet").lr == settings.finetune.lr


def test_importances_of_a_study_whose_trials_all_scored_the_same_are_flagged_degenerate() -> None:
    # A tiny random-init study can score every configuration the same (chance level): fANOVA then has
    # no variance to split, and the report must say so instead of crashing or inventing importances.
    from transferbench.config import TUNED_PARAMETERS as PARAMS
    from transferbench.tuning.analysis import importances

    space = {"lr": {"low": 1e-5, "high": 1e-2, "log": True}, "warmup_iters": {"low": 0, "high": 4},
             "warmup_lr": {"low": 1e-7, "high": 1e-4, "log": True}}
    records = [{"number": i, "config_index": i, "state": "COMPLETE", "score": 0.5,
                "params": {"lr": 10 ** -(2 + i / 3), "warmup_iters": i % 5, "warmup_lr": 10 ** -(4 + i / 4)}}
               for i in range(6)]
    out = importances(records, space=space, higher_better=True, seed=0, ped_anova_quantile=0.25)
    assert out["degenerate"] == {"fanova": True, "ped_anova": True}
    assert out["fanova"] == {k: 1 / len(PARAMS) for k in PARAMS}
    records[2] = {**records[2], "score": 0.9}
    varied = importances(records, space=space, higher_better=True, seed=0, ped_anova_quantile=0.25)
    assert varied["degenerate"]["fanova"] is False
