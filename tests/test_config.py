"""params.yaml loading: the shipped file validates; typos, wrong types and ranges fail by key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from transferbench.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "params.yaml"


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_params_load_into_frozen_settings() -> None:
    settings = load_settings(SHIPPED)
    assert isinstance(settings, Settings)
    assert settings.study.tasks and settings.study.backbones
    with pytest.raises(ValidationError, match="frozen"):
        settings.finetune.lr = 1.0  # type: ignore[misc]
    # Every study entry resolves to a catalogue entry.
    for name in settings.study.backbones:
        assert settings.backbone(name).family in ("convnet", "transformer")


def test_paper_defaults_are_the_dataclass_defaults() -> None:
    from transferbench.config import FinetuneSettings

    paper = FinetuneSettings()
    assert (paper.lr, paper.warmup_lr, paper.warmup_iters) == (1e-4, 1e-6, 200)
    assert (paper.head_dropout, paper.weight_decay, paper.label_smoothing) == (0.2, 1e-6, 0.1)
    assert (paper.plateau_patience, paper.plateau_factor, paper.early_stop_patience) == (3, 0.5, 10)
    assert (paper.img_size, paper.batch_size, paper.rotation_degrees) == (224, 32, 30.0)
    assert paper.adam_betas == (0.9, 0.999)


def test_misspelt_key_is_named_with_a_suggestion(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["warmup_iter"] = raw["finetune"].pop("warmup_iters")
    with pytest.raises(ConfigError) as exc:
        load_settings(_write(tmp_path, raw))
    message = str(exc.value)
    assert "finetune.warmup_iter'" in message and "unknown key" in message
    assert "did you mean 'warmup_iters'" in message and "allowed keys:" in message


def test_unknown_top_level_section_is_rejected(tmp_path: Path, raw: dict) -> None:
    raw["studdy"] = raw["study"]
    with pytest.raises(ConfigError, match=r"'studdy'.*did you mean 'study'"):
        load_settings(_write(tmp_path, raw))


def test_wrong_type_names_key_and_expected_type(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["batch_size"] = "thirty-two"
    with pytest.raises(ConfigError, match=r"finetune\.batch_size.*expected an integer"):
        load_settings(_write(tmp_path, raw))


def test_out_of_range_value_names_key_and_allowed_range(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["head_dropout"] = 1.5
    with pytest.raises(ConfigError, match=r"finetune\.head_dropout.*out of range.*>= 0 and < 1"):
        load_settings(_write(tmp_path, raw))


def test_literal_lists_allowed_values(tmp_path: Path, raw: dict) -> None:
    raw["study"]["modes"] = ["full", "partial"]
    with pytest.raises(ConfigError, match=r"study\.modes\[1\].*'full', 'linear_probe'"):
        load_settings(_write(tmp_path, raw))


def test_training_mode_is_a_study_dimension_not_a_protocol_value(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["mode"] = "linear_probe"
    with pytest.raises(ConfigError, match=r"finetune\.mode.*study dimension: set study\.modes"):
        load_settings(_write(tmp_path, raw))


def test_modes_and_seeds_per_task_and_evaluation_floors(tmp_path: Path, raw: dict) -> None:
    raw["tasks"]["synthetic"].update(modes=["linear_probe"], seeds=[4, 5])
    raw["compare"]["learning_floors"] = {"synthetic:linear_probe": 0.5, "synthetic_age": "trivial"}
    settings = load_settings(_write(tmp_path, raw))
    assert settings.modes_of("synthetic") == ("linear_probe",) and settings.seeds_of("synthetic") == (4, 5)
    assert settings.modes_of("covid_geo") == settings.study.modes and settings.seeds_of("covid_geo") == (0, 1, 2)
    assert settings.modes_of("synthetic_retrieval") == ("frozen",) and settings.seeds_of("synthetic_retrieval") == (0,)
    raw["compare"]["learning_floors"] = {"synthetic:partial": 0.5}
    with pytest.raises(ConfigError, match=r"compare\.learning_floors\.synthetic:partial"):
        load_settings(_write(tmp_path, raw))


def test_retrieval_tasks_are_not_trained_and_trained_tasks_need_a_split(tmp_path: Path, raw: dict) -> None:
    bad = {**raw, "study": {**raw["study"], "tasks": [*raw["study"]["tasks"], "synthetic_retrieval"],
                            "retrieval_tasks": []}}
    with pytest.raises(ConfigError, match=r"tasks\.synthetic_retrieval\.kind.*list it under study\.retrieval_tasks"):
        load_settings(_write(tmp_path, bad))
    bad = {**raw, "study": {**raw["study"], "retrieval_tasks": ["synthetic"]}}
    with pytest.raises(ConfigError, match=r"study\.retrieval_tasks.*\['synthetic'\] also listed in study\.tasks"):
        load_settings(_write(tmp_path, bad))
    bad = {**raw, "study": {**raw["study"], "retrieval_tasks": ["flowers102"]}}
    with pytest.raises(ConfigError, match=r"study\.retrieval_tasks.*'flowers102' is a classification task"):
        load_settings(_write(tmp_path, bad))
    del raw["tasks"]["synthetic_age"]["split"]
    with pytest.raises(ConfigError, match=r"tasks\.synthetic_age\.split.*needs a split rule"):
        load_settings(_write(tmp_path, raw))


def test_backbone_family_and_weights_are_checked(tmp_path: Path, raw: dict) -> None:
    name = raw["study"]["backbones"][0]
    raw["backbones"][name]["family"] = "mlp"
    with pytest.raises(ConfigError, match=rf"backbones\.{name}\.family.*'convnet', 'transformer'"):
        load_settings(_write(tmp_path, raw))
    raw["backbones"][name]["family"] = "convnet"
    raw["backbones"][name]["weights"] = "imagenet"
    with pytest.raises(ConfigError, match=rf"backbones\.{name}\.weights.*'hub', 'none', 'file:<path>'"):
        load_settings(_write(tmp_path, raw))


def test_study_must_name_defined_backbones(tmp_path: Path, raw: dict) -> None:
    raw["study"]["backbones"] = ["no_such_net"]
    with pytest.raises(ConfigError, match=r"study\.backbones.*'no_such_net'"):
        load_settings(_write(tmp_path, raw))


def test_missing_file_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_elastic_worker_range_and_placement_strategy(tmp_path: Path, raw: dict) -> None:
    assert load_settings(_write(tmp_path, raw)).ray.scaling_workers == raw["ray"]["num_workers"]
    raw["ray"].update(num_workers=4, min_workers=2, placement_strategy="SPREAD")
    settings = load_settings(_write(tmp_path, raw))
    assert settings.ray.scaling_workers == (2, 4) and settings.ray.placement_strategy == "SPREAD"
    raw["ray"]["min_workers"] = 5
    with pytest.raises(ConfigError, match=r"ray\.min_workers.*more than ray\.num_workers \(4\)"):
        load_settings(_write(tmp_path, raw))
    raw["ray"].update(min_workers=0)
    with pytest.raises(ConfigError, match=r"ray\.min_workers.*out of range"):
        load_settings(_write(tmp_path, raw))
    raw["ray"].update(min_workers=None, placement_strategy="RANDOM")
    with pytest.raises(ConfigError, match=r"ray\.placement_strategy.*'PACK', 'SPREAD'"):
        load_settings(_write(tmp_path, raw))


def test_ray_storage_path_must_be_a_mounted_path_not_a_uri(tmp_path: Path, raw: dict) -> None:
    raw["ray"]["storage_path"] = "/mnt/shared/ray_results"
    assert load_settings(_write(tmp_path, raw)).ray.storage_path == "/mnt/shared/ray_results"
    raw["ray"]["storage_path"] = "s3://bucket/ray_results"
    with pytest.raises(ConfigError, match=r"ray\.storage_path.*'s3://bucket/ray_results' is a URI.*mounts"):
        load_settings(_write(tmp_path, raw))


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("finetune", "max_epochs", True, "expected an integer, got True"),  # a bool is not an int
    ("finetune", "batch_size", 16.0, "expected an integer, got 16.0"),
    ("finetune", "lr", "1e-3", "expected a number, got '1e-3'"),  # YAML reads 1e-3 (no dot) as a string
    ("finetune", "lr", None, "expected a number, got None"),
    ("finetune", "hflip", 1, "expected true or false, got 1"),
    ("ray", "num_workers", "2", "expected an integer, got '2'"),
    ("tracking", "experiment", 7, "expected a string, got 7"),
    ("study", "seeds", [0, "1"], "study.seeds[1]': expected an integer"),
])
def test_wrong_types_are_refused_naming_the_key(tmp_path: Path, raw: dict, section: str, key: str, value,
                                                message: str) -> None:
    raw[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        load_settings(_write(tmp_path, raw))
    assert f"params key '{section}.{key}" in str(exc.value)


def test_an_integer_is_a_valid_number_and_every_section_is_frozen_pydantic(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["lr"] = 1  # YAML's 1 for a float field
    settings = load_settings(_write(tmp_path, raw))
    assert settings.finetune.lr == 1.0 and isinstance(settings.finetune.lr, float)
    for name in Settings.model_fields:
        section = getattr(settings, name)
        if hasattr(section, "model_config"):
            assert section.model_config["frozen"] and section.model_config["extra"] == "forbid", name


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("study", "seeds", [], "must list at least one entry"),
    ("study", "tasks", [], "must list at least one entry"),
    ("study", "backbones", [], "must list at least one entry"),
    ("finetune", "max_epochs", 0, "out of range; allowed: >= 1"),
])
def test_empty_study_lists_and_zero_epochs_fail_at_load(tmp_path: Path, raw: dict, section: str, key: str, value,
                                                        message: str) -> None:
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}.*{re.escape(message)}"):
        load_settings(_write(tmp_path, raw))
