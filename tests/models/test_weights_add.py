"""``transferbench weights add`` (issue #26): a downloaded timm checkpoint becomes a backbone's ``file:`` weights.

Real parts: timm's tiny ``test_*`` models, safetensors and ``torch.save`` files, DVC in a temporary git
repository, and a fine-tune (Ray Train local mode, MLflow SQLite) that loads the imported file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from engine.conftest import toy_params, toy_splits  # noqa: F401 -- the session fixture
from transferbench.cli import main
from transferbench.config import ConfigError, load_settings
from transferbench.engine.checkpoints import latest_checkpoint
from transferbench.engine.tasks import MetricSpec
from transferbench.evaluation.ranking import rank_table
from transferbench.evaluation.reports import rank_table_markdown
from transferbench.evaluation.results import read_result, record_path, result_path
from transferbench.models.weights import CheckpointMismatchError, WeightsImportError, add_weights, set_weights
from transferbench.stages.finetune import run_finetune

CATALOGUE = """\
backbones:
  # tiny: timm's test_* models
  test_resnet: {model: test_resnet, family: convnet, weights: none, preset: tiny}  # a ConvNet
  test_vit: {model: test_vit, family: transformer, weights: none, preset: tiny}    # imported weights go here
"""
BEFORE = "{model: test_vit, family: transformer, weights: none, preset: tiny}"
AFTER = "{model: test_vit, family: transformer, weights: file:models/test_vit.safetensors, preset: tiny}"


def _git_dvc_init(root: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)


def _params(root: Path, splits: Path) -> Path:
    raw = toy_params(splits, ray={"storage_path": str(root / "ray_results")},
                     tracking={"tracking_uri": f"sqlite:///{root / 'mlruns.db'}",
                               "artifact_location": str(root / "mlartifacts")})
    del raw["backbones"]
    params = root / "params.yaml"
    params.write_text("# the toy study\n" + yaml.safe_dump(raw, sort_keys=False) + CATALOGUE)
    return params


@pytest.fixture
def repo(tmp_path: Path, toy_splits: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """A git + DVC repository holding the toy study's params.yaml (the catalogue written by hand, with comments)."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    _git_dvc_init(tmp_path)
    _params(tmp_path, toy_splits)
    return tmp_path


def _checkpoint(model: str, **kwargs) -> dict[str, torch.Tensor]:
    """A timm model's state dict, moved well away from any fresh initialisation (so a random init cannot match)."""
    torch.manual_seed(7)
    state = timm.create_model(model, pretrained=False, **kwargs).state_dict()
    return {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def test_a_checkpoint_of_another_architecture_is_refused_naming_its_keys(repo, capsys):
    params, before = repo / "params.yaml", (repo / "params.yaml").read_text()
    save_file(_checkpoint("test_resnet"), repo / "resnet.safetensors")
    code = main(["--params", str(params), "weights", "add", "test_vit", str(repo / "resnet.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert "resnet.safetensors does not fit timm model 'test_vit'" in err
    assert "missing keys: cls_token, pos_embed, patch_embed.proj.weight" in err  # the first 10 of each
    assert "78 missing keys" in err and "92 unexpected keys: bn1.bias, bn1.num_batches_tracked" in err
    assert "(82 more)" in err
    assert not (repo / "models").exists() and params.read_text() == before

    state = _checkpoint("test_vit")
    state["pos_embed"] = state["pos_embed"][:, :50]
    torch.save(state, repo / "short.pth")
    with pytest.raises(CheckpointMismatchError, match=r"1 shape mismatches: pos_embed \(file \[1, 50, 64\], "
                                                      r"model \[1, 101, 64\]\)"):
        add_weights(params, "test_vit", repo / "short.pth")
    assert not (repo / "models").exists() and params.read_text() == before


def test_unsafe_or_unknown_files_are_refused(repo):
    params = repo / "params.yaml"
    torch.save({"state_dict": _checkpoint("test_vit"), "hook": subprocess.run}, repo / "pickled.pth")
    with pytest.raises(WeightsImportError, match="pickled.pth: cannot read it"):
        add_weights(params, "test_vit", repo / "pickled.pth")
    with pytest.raises(WeightsImportError, match=r"ending in \.safetensors, \.pth, \.bin"):
        add_weights(params, "test_vit", repo / "weights.npz")
    with pytest.raises(ConfigError, match="unknown backbone 'vit_x'"):
        add_weights(params, "vit_x", repo / "pickled.pth")
    assert not (repo / "models").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_matching_checkpoint_is_imported_tracked_and_named_in_params(repo, suffix, capsys):
    params = repo / "params.yaml"
    before = params.read_text()
    if suffix == ".safetensors":
        state = _checkpoint("test_vit")
        save_file(state, repo / "downloaded.safetensors")
    else:  # a training checkpoint: nested, DDP-prefixed, with a 10-class head the fine-tune drops anyway
        state = _checkpoint("test_vit", num_classes=10)
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, repo / "downloaded.pth")
    assert main(["weights", "add", "test_vit", str(repo / f"downloaded{suffix}"), "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "-> models/test_vit.safetensors" in out and "dvc push" in out

    written = load_file(repo / "models" / "test_vit.safetensors")
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())
    assert (repo / "models" / "test_vit.safetensors.dvc").is_file()
    assert "/test_vit.safetensors" in (repo / "models" / ".gitignore").read_text().splitlines()
    assert params.read_text() == before.replace(BEFORE, AFTER)  # comments and layout survive
    assert load_settings(params).backbone("test_vit").weights == "file:models/test_vit.safetensors"


def test_a_failing_dvc_add_is_reported_and_params_stay(repo):
    params, before = repo / "params.yaml", (repo / "params.yaml").read_text()
    save_file(_checkpoint("test_vit"), repo / "downloaded.safetensors")
    (repo / "models").mkdir()
    (repo / "models" / "test_vit.safetensors").write_bytes((repo / "downloaded.safetensors").read_bytes())
    subprocess.run(["git", "add", "models/test_vit.safetensors"], cwd=repo, check=True)  # git's: DVC refuses it
    with pytest.raises(WeightsImportError, match=r"`dvc add models/test_vit.safetensors` failed .* already tracked "
                                                 r"by SCM.* params.yaml is unchanged"):
        add_weights(params, "test_vit", repo / "downloaded.safetensors")
    assert params.read_text() == before and not (repo / "models" / "test_vit.safetensors.dvc").exists()


def test_outside_a_dvc_repository_only_with_no_dvc(tmp_path, toy_splits):  # noqa: F811
    params = _params(tmp_path, toy_splits)
    save_file(_checkpoint("test_resnet"), tmp_path / "r.safetensors")
    with pytest.raises(WeightsImportError, match=r"not a DVC repository .*dvc init.*--no-dvc"):
        add_weights(params, "test_resnet", tmp_path / "r.safetensors")
    assert not (tmp_path / "models").exists()
    done = add_weights(params, "test_resnet", tmp_path / "r.safetensors", name="resnet-ft", dvc=False)
    assert done.dvc_file is None and (tmp_path / "models" / "resnet-ft.safetensors").is_file()
    assert load_settings(params).backbone("test_resnet").weights == "file:models/resnet-ft.safetensors"
    # Again: the same tensors are fine; other ones under that name are not (runs know weights by their name).
    assert add_weights(params, "test_resnet", tmp_path / "r.safetensors", name="resnet-ft", dvc=False).existed
    save_file(_checkpoint("test_resnet", num_classes=5), tmp_path / "other.safetensors")
    with pytest.raises(WeightsImportError, match="already holds other weights: import these under another --name, or remove it first"):
        add_weights(params, "test_resnet", tmp_path / "other.safetensors", name="resnet-ft", dvc=False)


def test_set_weights_changes_the_value_alone_or_adds_the_key():
    text = ("backbones:\n"
            "  a:  # block style, no weights yet\n"
            "    model: test_vit   # the model\n"
            "    family: transformer\n"
            "  b: {model: test_resnet, family: convnet}  # flow\n"
            "  c: {model: test_resnet, family: convnet, weights: \"hub\"}\n"
            "  d: *c\n")
    text = text.replace("  c: {", "  c: &c {")
    assert set_weights(text, "a", "file:m/a.safetensors") == text.replace(
        "    model: test_vit", "    weights: file:m/a.safetensors\n    model: test_vit")
    assert set_weights(text, "b", "file:m/b.safetensors") == text.replace(
        "family: convnet}  # flow", "family: convnet, weights: file:m/b.safetensors}  # flow")
    assert set_weights(text, "c", "file:m/c.safetensors") == text.replace('"hub"', '"file:m/c.safetensors"')
    with pytest.raises(ConfigError, match="alias"):
        set_weights(text, "d", "file:m/d.safetensors")


@pytest.mark.slow  # a fine-tune (Ray Train local mode), a few seconds
def test_a_fine_tune_loads_the_imported_file_and_says_so(repo, monkeypatch):
    save_file(_checkpoint("test_vit"), repo / "downloaded.safetensors")
    add_weights(repo / "params.yaml", "test_vit", repo / "downloaded.safetensors")
    monkeypatch.chdir(repo)  # stages run at the repository root, where file:models/... resolves
    settings = load_settings("params.yaml")
    # The linear probe never changes the backbone: its checkpoint holds the weights the fine-tune started from.
    result = run_finetune(settings, task="toy", backbone="test_vit", seed=0, mode="linear_probe",
                          metrics_dir=repo / "metrics", plots_dir=repo / "plots")
    trained = latest_checkpoint(Path(settings.ray.storage_path) / result["ray_run_name"])["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    file = load_file(repo / "models" / "test_vit.safetensors")
    assert backbone.keys() == file.keys() - {"head.weight", "head.bias"}  # num_classes=0: timm drops the head
    for key, tensor in backbone.items():
        if key == "pos_embed":  # resampled by timm from the file's 10x10 grid to the fine-tune's 2x2 (32 px)
            assert torch.allclose(tensor, resample_abs_pos_embed(file[key], new_size=(2, 2), num_prefix_tokens=1))
        else:
            assert torch.equal(tensor, file[key]), key

    assert (result["weights"], result["weights_label"], result["random_init"]) == \
        ("file:models/test_vit.safetensors", "file-pretrained", False)
    tags = mlflow.MlflowClient(settings.tracking.tracking_uri).get_run(result["mlflow_run_id"]).data.tags
    assert (tags["weights"], tags["weights_label"], tags["random_init"]) == \
        ("file:models/test_vit.safetensors", "file-pretrained", "false")
    metrics_file = result_path(repo / "metrics", "toy", "test_vit", 0, "linear_probe")
    assert metrics_file == repo / "metrics" / "toy" / "test_vit" / "linear_probe" / "seed0.json"
    table = rank_table([read_result(metrics_file, record_path(repo / "metrics", metrics_file))],
                       study="toy-study", task_metrics={"toy:linear_probe": MetricSpec("balanced_accuracy")},
                       backbones={"test_vit": settings.backbone("test_vit")})
    markdown = rank_table_markdown(table)
    assert table["backbones"]["test_vit"]["weights_label"] == "file:models/test_vit.safetensors (local checkpoint)"
    assert "| `test_vit` | transformer | file:models/test_vit.safetensors (local checkpoint) |" in markdown
    assert "random" not in markdown.lower() and "say nothing" not in markdown  # pretrained: its ranks count

    # Other tensors in the same file are a new run, not the finished one reused: the run identity hashes the file.
    again = run_finetune(settings, task="toy", backbone="test_vit", seed=0, mode="linear_probe",
                         metrics_dir=repo / "metrics", plots_dir=repo / "plots")
    assert again["mlflow_run_id"] == result["mlflow_run_id"]  # unchanged weights: the completed run, reused
    save_file({k: v + 1 for k, v in file.items()}, repo / "models" / "test_vit.safetensors")
    changed = run_finetune(settings, task="toy", backbone="test_vit", seed=0, mode="linear_probe",
                           metrics_dir=repo / "metrics", plots_dir=repo / "plots")
    assert changed["ray_run_name"] != result["ray_run_name"] and changed["mlflow_run_id"] != result["mlflow_run_id"]
