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


def _edited(tmp_path: Path, **values: str) -> Path:
    """The shipped params.yaml with ``section__key: <YAML text>`` set in place (comments and formatting kept), as
    a user would edit it: PyYAML's dump would not show what YAML text the loader was given."""
    text = SHIPPED.read_text()
    for dotted, value in values.items():
        section, key = dotted.split("__")
        body = re.search(rf"^{section}:\n((?:[ #].*\n|\n)*)", text, re.M)
        line = re.search(rf"^  {key}:[^#\n]*?(?=\s*(#.*)?$)", body.group(1), re.M)
        assert line, f"{section}.{key} is not in the shipped params.yaml"
        at = body.start(1) + line.start()
        text = text[:at] + f"  {key}: {value}" + text[body.start(1) + line.end():]
    path = tmp_path / "params.yaml"
    path.write_text(text)
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


def test_an_integer_is_a_valid_number_and_every_section_is_frozen_pydantic(tmp_path: Path, raw: dict) -> None:
    raw["finetune"]["lr"] = 1  # YAML's 1 for a float field
    settings = load_settings(_write(tmp_path, raw))
    assert settings.finetune.lr == 1.0 and isinstance(settings.finetune.lr, float)
    for name in Settings.model_fields:
        section = getattr(settings, name)
        if hasattr(section, "model_config"):
            assert section.model_config["frozen"] and section.model_config["extra"] == "forbid", name


@pytest.mark.parametrize(("key", "value", "message"), [
    ("finetune.max_epochs", "true", "expected an integer >= 1, got true (a bool)"),
    ("finetune.batch_size", "false", "expected an integer >= 1, got false (a bool)"),
    ("finetune.batch_size", "16.0", "expected an integer >= 1, got 16.0"),
    ("finetune.lr", '"1e-4"', "expected a number > 0, got '1e-4' (a string: a number is written without quotes)"),
    ("finetune.lr", "true", "expected a number > 0, got true (a bool)"),
    ("finetune.lr", "null", "expected a number > 0, got null"),
    ("finetune.head_dropout", "[0.2]", "expected a number >= 0 and < 1, got [0.2] (a list)"),
    ("finetune.hflip", "1", "expected true or false, got 1"),
    ("ray.num_workers", '"2"', "expected an integer >= 0, got '2' (a string: a number is written without quotes)"),
    ("tracking.experiment", "7", "expected a string, got 7"),
    ("study.name", "null", "expected a string, got null"),
    ("study.tasks", "null", "expected a list, got null"),
    ("study.seeds", '[0, "1"]', "study.seeds[1]': expected an integer >= 0, got '1' (a string"),
])
def test_wrong_types_are_refused_naming_the_key(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        load_settings(_edited(tmp_path, **{key.replace(".", "__"): value}))
    assert str(exc.value).startswith(f"params key '{key}")


def test_a_plain_exponent_is_a_number_as_dvc_reads_and_writes_it(tmp_path: Path) -> None:
    # PyYAML alone reads 1e-4 (no dot, or an unsigned exponent) as a string; DVC's YAML 1.2 reads a number,
    # and `dvc exp run -S finetune.warmup_lr=1e-6` writes 1e-06.
    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    settings = load_settings(_edited(tmp_path, finetune__lr="1e-4", finetune__warmup_lr="1e-06",
                                     finetune__weight_decay="1E+0"))
    assert (settings.finetune.lr, settings.finetune.warmup_lr, settings.finetune.weight_decay) == (1e-4, 1e-6, 1.0)


@pytest.mark.parametrize("key", ["finetune.max_epochs", "finetune.batch_size", "finetune.eval_batch_size",
                                 "finetune.early_stop_patience", "sensitivity.max_epochs", "ray.checkpoints_to_keep"])
def test_counts_below_one_fail_at_load(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^params key '{re.escape(key)}': 0 is out of range; allowed: >= 1$"):
        load_settings(_edited(tmp_path, **{key.replace(".", "__"): "0"}))


@pytest.mark.parametrize("key", ["study.seeds", "study.backbones", "study.modes"])
def test_empty_study_lists_fail_at_load(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^params key '{re.escape(key)}': must list at least one entry$"):
        load_settings(_edited(tmp_path, **{key.replace(".", "__"): "[]"}))


def test_a_study_may_train_nothing_but_must_evaluate_something(tmp_path: Path) -> None:
    # The shipped multi-task tasks combine trained tasks, so emptying study.tasks alone names them.
    with pytest.raises(ConfigError, match=r"^params key 'tasks\.synthetic_seg_depth\.components': 'synthetic_seg' "
                                          r"is not in study\.tasks"):
        load_settings(_edited(tmp_path, study__tasks="[]"))
    retrieval_only = load_settings(_edited(tmp_path, study__tasks="[]", study__multitask_tasks="[]"))
    assert retrieval_only.study.tasks == () and retrieval_only.study.retrieval_tasks == ("synthetic_retrieval",)
    with pytest.raises(ConfigError, match=r"^params key 'study\.tasks': the study evaluates nothing: list at least "
                                          r"one task under study\.tasks \(trained\) or study\.retrieval_tasks"):
        load_settings(_edited(tmp_path, study__tasks="[]", study__multitask_tasks="[]", study__retrieval_tasks="[]"))


@pytest.mark.parametrize(("key", "value", "catalogue"), [
    ("study.backbones", "[test_resnet, test_vit3]", "backbones"),
    ("study.tasks", "[covid_geo, synthetic, synthetic_age, synthetic_b, synthetic_seg, synthetic_depth, flower102]",
     "tasks"),
    ("study.retrieval_tasks", "[oxford5]", "tasks"),
    ("sensitivity.backbones", "[test_resnet, resnet19]", "backbones"),
])
def test_study_names_missing_from_the_catalogue_fail_at_load(tmp_path: Path, key: str, value: str,
                                                             catalogue: str) -> None:
    missing = value.strip("[]").split(", ")[-1]
    with pytest.raises(ConfigError, match=rf"^params key '{re.escape(key)}': '{missing}' is not defined under "
                                          rf"'{catalogue}'; allowed values: "):
        load_settings(_edited(tmp_path, **{key.replace(".", "__"): value}))


def test_every_shipped_task_reads_a_registered_dataset(tmp_path: Path) -> None:
    from transferbench.data.registry import list_datasets

    settings = load_settings(SHIPPED, datasets=list_datasets())
    assert {t.dataset for t in settings.tasks.values()} - {None} <= set(list_datasets())
    typo = tmp_path / "params.yaml"
    typo.write_text(SHIPPED.read_text().replace("dataset: flowers102", "dataset: flower102", 1))
    with pytest.raises(ConfigError, match=r"^params key 'tasks\.flowers102\.dataset': 'flower102' is not a registered "
                                          r"dataset \(did you mean 'flowers102'\?\); allowed values: caltech101, "):
        load_settings(typo, datasets=list_datasets())


def test_a_task_without_a_dataset_fails_at_load(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(SHIPPED.read_text().replace("dataset: flowers102", "dataset: null", 1))
    with pytest.raises(ConfigError, match=r"^params key 'tasks\.flowers102\.dataset': missing \(or null\); a task "
                                          r"of kind 'classification' reads a dataset$"):
        load_settings(path)
