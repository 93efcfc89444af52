"""Checkpoint writes off the critical path (issue #25): ``snapshot`` + ``StateWriter``, with a real model,
optimiser and file system (the sigkill-mid-write test is in test_local_mode.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from transferbench.engine.checkpoints import CheckpointWriteError, StateWriter, load_state, snapshot
from transferbench.engine.spec import STATE_FILE


def _trained(width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an Adam that has stepped once, so the optimiser state holds tensors too."""
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _step(model, optimizer)
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, model.in_features)).square().sum().backward()
    optimizer.step()  # in place: parameters and Adam's moments


def test_the_write_runs_after_start_returns_and_writes_the_snapshot_not_the_later_model(tmp_path):
    model, optimizer = _trained(3000)  # ~9M parameters: 110 MB of state with Adam's moments
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": {"epoch": 1}}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    writer = StateWriter()
    write = writer.start(tmp_path / "epoch_0001", snapshot(state))
    # a write of 110 MB takes far longer than getting here: start did not wait for it
    assert not write.done() and not (tmp_path / "epoch_0001" / STATE_FILE).exists()
    _step(model, optimizer)  # the next epoch trains while the write is in flight
    assert not torch.equal(model.weight, expected["weight"])
    writer.wait()
    assert write.done() and not (tmp_path / "epoch_0001" / f"{STATE_FILE}.tmp").exists()
    written = load_state(tmp_path / "epoch_0001")
    assert written["loop"] == {"epoch": 1}
    assert all(torch.equal(written["model"][k], v) for k, v in expected.items())
    assert torch.equal(written["optimizer"]["state"][0]["exp_avg"], expected_moment)


def test_one_write_in_flight_each_started_after_the_one_before_is_on_disk(tmp_path):
    model, optimizer = _trained(1000)
    writer = StateWriter()
    first = writer.start(tmp_path / "epoch_0001", snapshot({"model": model.state_dict()}))
    second = writer.start(tmp_path / "epoch_0002", snapshot({"model": model.state_dict()}))
    assert first.done() and (tmp_path / "epoch_0001" / STATE_FILE).is_file()
    writer.wait()
    assert second.done() and (tmp_path / "epoch_0002" / STATE_FILE).is_file()


def test_a_failed_write_is_raised_naming_the_file_and_leaves_no_state_file(tmp_path):
    directory = tmp_path / "epoch_0003"
    directory.mkdir()
    # a full disk: /dev/full fails every write, as a file system with no space left would
    os.symlink("/dev/full", directory / f"{STATE_FILE}.tmp")
    writer = StateWriter()
    writer.start(directory, snapshot({"model": {"w": torch.zeros(1_000_000)}}))
    with pytest.raises(CheckpointWriteError, match=f"writing checkpoint {directory / STATE_FILE} failed"):
        writer.wait()
    assert not (directory / STATE_FILE).exists()
    writer.wait()  # raised once: a later wait (after the run has handled it) has nothing in flight


def test_no_writer_thread_outlives_its_write(tmp_path: Path) -> None:
    """The CLI's exit joins every non-daemon thread: an idle writer thread would hang every stage at its end."""
    writer = StateWriter()
    writer.start(tmp_path / "epoch_0001", {"x": torch.zeros(3)})
    writer.wait()
    writers = [t for t in threading.enumerate() if t.name.startswith("checkpoint-writer")]
    for thread in writers:
        thread.join(timeout=10)
    assert not [t.name for t in writers if t.is_alive()]
    assert (tmp_path / "epoch_0001" / "state.pt").is_file()
