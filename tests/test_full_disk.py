"""A full disk (issue #24): ``data.splits_dir``, ``compare.metrics_dir`` or ``ray.storage_path`` on a small tmpfs.

A write that hits ENOSPC fails the stage with a ``TransferbenchError`` naming the file and "no space left" (the
CLI prints it and exits 2); every file under a final name still parses (writes go to a temporary path, then a
rename: ``transferbench.atomic``, ``checkpoints.StateWriter``) and no temporary file is left taking space; once
space is freed, a rerun completes (resuming a fine-tune from its last complete checkpoint).

Real parts: a tmpfs mounted for each test (root only; CI runs as root), the real split stage through the CLI,
real fine-tunes in Ray Train local mode. The /dev/full case of a checkpoint write is in
tests/engine/test_checkpoints.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from engine.conftest import toy_settings, toy_splits  # noqa: F401 -- toy_splits: a fixture of the fine-tunes
from transferbench import cli
from transferbench.config import Settings, build
from transferbench.data.synthetic import generate
from transferbench.engine.finetune import COMPLETED_FILE
from transferbench.engine.run_files import load_result, record_path, result_path
from transferbench.engine.spec import STATE_FILE, checkpoint_name
from transferbench.errors import TransferbenchError
from transferbench.stages.finetune import run_finetune

REPO = Path(__file__).resolve().parents[1]
FILLER = "filler"


@pytest.fixture
def disk(tmp_path: Path):
    """A 64 MiB tmpfs (the toy model's checkpoint: 4.5 MB), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where}: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)  # a file still open: detach it now


def _fill(disk: Path, leave: int) -> None:
    """Take all of ``disk``'s free space but ``leave`` bytes, with a filler file."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    assert free > leave, f"the tmpfs is too small: {free} bytes free, {leave} to leave"
    with (disk / FILLER).open("wb") as filler:
        filler.write(b"\xff" * (free - leave))


def _free(disk: Path) -> None:
    (disk / FILLER).unlink()


def _final_files(root: Path) -> dict[Path, bytes]:
    """Every file under a final name below ``root``, each checked to be whole (it parses), with its bytes;
    a temporary file left behind fails."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != FILLER):
        assert not path.name.endswith(".tmp"), f"a temporary file was left behind: {path}"
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            pd.read_csv(path)
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        else:
            assert path.read_text().strip(), f"{path} is empty"
        files[path] = path.read_bytes()
    return files


def test_a_split_that_fills_the_disk_fails_naming_the_file_and_leaves_the_previous_split(tmp_path, disk,
                                                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSFERBENCH_DATA_MIRROR", raising=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["splits_dir"] = str(disk / "splits")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    settings = build(Settings, raw)
    generate(settings.data.synthetic, Path(settings.data.generated_dir) / "synthetic")
    split = ["--params", str(tmp_path / "params.yaml"), "split", "synthetic"]
    assert cli.main(split) == 0
    before = _final_files(disk)
    written = sum(len(b) for b in before.values())
    assert len(before) == 5 and written > 16 * 1024

    _fill(disk, leave=written // 2)  # the next split's directory is written whole before it replaces this one
    capsys.readouterr()
    assert cli.main(split) == 2
    error = capsys.readouterr().err
    assert error.startswith("transferbench split: error: writing ") and "no space left on device" in error
    assert str(disk / "splits" / "synthetic") in error and "Traceback" not in error
    assert _final_files(disk) == before, "the previous split was changed"

    _free(disk)
    assert cli.main(split) == 0
    assert _final_files(disk) == before  # the same split again: deterministic


def _toy(toy_splits: Path, tmp_path: Path, *, storage: Path, epochs: int) -> Settings:
    return toy_settings(toy_splits, finetune={"max_epochs": epochs, "early_stop_patience": 50},
                        ray={"num_workers": 0, "storage_path": str(storage), "checkpoints_to_keep": 50},
                        tracking={"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
                                  "artifact_location": str(tmp_path / "mlartifacts")})


def _finetune(settings: Settings, metrics_dir: Path, plots_dir: Path, **options) -> dict:
    return run_finetune(settings, task="toy", backbone="test_resnet", seed=0, metrics_dir=metrics_dir,
                        plots_dir=plots_dir, **options)


@pytest.mark.slow
def test_a_finetune_whose_metrics_dir_is_full_fails_naming_the_file_and_completes_once_space_is_freed(
        toy_splits, tmp_path, disk):
    settings = _toy(toy_splits, tmp_path, storage=tmp_path / "ray_results", epochs=2)
    metrics, plots = disk / "metrics", tmp_path / "plots"
    _finetune(settings, metrics, plots)
    before = _final_files(disk)
    metrics_file = result_path(metrics, "toy", "test_resnet", 0)
    record_file = record_path(metrics, metrics_file)
    assert set(before) == {metrics_file, record_file}  # the run's metrics and its record, both on the full disk

    _fill(disk, leave=0)
    with pytest.raises(TransferbenchError, match="no space left on device") as failed:
        _finetune(settings, metrics, plots, fresh=True)  # trains again, then writes its record and metrics JSON
    assert str(record_file) in str(failed.value)  # the record is written first
    assert _final_files(disk) == before, "the previous metrics JSON or its record was changed"
    (run_dir,) = (tmp_path / "ray_results").iterdir()
    trained = {p: p.stat().st_mtime_ns for p in run_dir.glob(f"*/{STATE_FILE}")}
    assert len(trained) == 2 and not (run_dir / COMPLETED_FILE).exists()

    _free(disk)
    result = _finetune(settings, metrics, plots)
    assert result["epochs_run"] == 2 and (run_dir / COMPLETED_FILE).is_file()
    assert {p: p.stat().st_mtime_ns for p in trained} == trained, "trained again instead of resuming"
    assert load_result(metrics_file, record_file) == result


@pytest.mark.slow
def test_a_finetune_whose_storage_fills_up_fails_naming_the_checkpoint_and_resumes_once_space_is_freed(
        toy_splits, tmp_path, disk):
    storage, metrics, plots = disk / "ray_results", tmp_path / "metrics", tmp_path / "plots"
    first = _finetune(_toy(toy_splits, tmp_path, storage=storage, epochs=2), metrics, plots)
    previous_run = storage / first["ray_run_name"]
    state_size = (previous_run / checkpoint_name(1) / STATE_FILE).stat().st_size
    before = _final_files(disk)

    # Another run (4 epochs): room for its first two checkpoints, not for the third.
    settings = _toy(toy_splits, tmp_path, storage=storage, epochs=4)
    page = os.statvfs(disk).f_frsize
    _fill(disk, leave=2 * (state_size + 2 * page) + state_size // 2 + 2 * page)
    with pytest.raises(TransferbenchError, match="no space left on device") as failed:
        _finetune(settings, metrics, plots)
    (run_dir,) = (p for p in storage.iterdir() if p != previous_run)
    assert f"writing checkpoint {run_dir / checkpoint_name(3) / STATE_FILE} failed" in str(failed.value)
    after = _final_files(disk)
    assert {p: b for p, b in after.items() if p.is_relative_to(previous_run)} == before, "the complete run changed"
    assert sorted(p.parent.name for p in run_dir.glob(f"*/{STATE_FILE}")) == [checkpoint_name(1), checkpoint_name(2)]
    assert not (run_dir / COMPLETED_FILE).exists()

    _free(disk)
    result = _finetune(settings, metrics, plots)
    assert result["resumed_at_epochs"] == [2] and result["epochs_run"] == 4
    assert (run_dir / COMPLETED_FILE).is_file()
    _final_files(disk)
