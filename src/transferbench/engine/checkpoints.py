"""The run directory's checkpoints: the newest complete one (local mode's resume) and pruning.

Rank 0 writes each epoch's state as ``epoch_NNNN/state.pt.tmp`` and renames it ``state.pt`` when
complete, so a checkpoint being written when the process died is never taken for a complete one.
The write runs in a background thread (``StateWriter``) on a CPU copy of the state, so that the
next epoch does not wait for the disk.
With Ray Train worker actors, Ray Train keeps the checkpoint state; local mode keeps none across
processes, so a rerun looks here.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from transferbench.atomic import no_space
from transferbench.engine.spec import STATE_FILE, checkpoint_name
from transferbench.errors import TransferbenchError

logger = logging.getLogger(__name__)
_PREFIX = checkpoint_name(0)[:-4]  # "epoch_"


def epoch_of(directory: Path) -> int | None:
    digits = directory.name[len(_PREFIX):]
    return int(digits) if directory.name.startswith(_PREFIX) and digits.isdigit() else None


def load_state(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain values only: ``weights_only``)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str | Path, *, newest: int | None = None) -> dict[str, Any] | None:
    """The newest complete checkpoint's state in ``run_dir`` (of epoch ``newest`` or before, if given), or None.

    Only ``state.pt`` counts. A ``state.pt`` that does not load (truncated or empty after a crash of the
    machine, or cut short by a full disk) is skipped with a warning naming it, and the one before it is used.
    """
    epochs = sorted(((e, d) for d in Path(run_dir).glob(_PREFIX + "*")
                     if (e := epoch_of(d)) is not None and (newest is None or e <= newest)), reverse=True)
    for _, directory in epochs:
        path = directory / STATE_FILE
        if not path.is_file():
            continue
        try:
            return load_state(directory)
        except Exception as exc:  # noqa: BLE001 -- any unreadable file: fall back to the previous checkpoint
            logger.warning("skipping unreadable checkpoint %s (%s: %s); resuming from the one before it",
                           path, type(exc).__name__, exc)
    return None


def prune_checkpoints(run_dir: str | Path, history: list[dict[str, float]], *, keep: int, selection: str,
                      higher_is_better: bool) -> list[int]:
    """Delete the checkpoints of ``history``'s epochs but the ``keep`` best by ``val_<selection>`` and the
    latest, as Ray Train's ``CheckpointConfig`` does; returns the epochs kept."""
    scores = {int(r["epoch"]): r[f"val_{selection}"] for r in history}
    present = {e: d for d in Path(run_dir).iterdir() if (e := epoch_of(d)) is not None and e in scores}
    if not present:
        return []
    order = sorted(present, key=lambda e: (-scores[e] if higher_is_better else scores[e], e))
    kept = set(order[:keep]) | {max(present)}
    for epoch, directory in present.items():
        if epoch not in kept:
            shutil.rmtree(directory, ignore_errors=True)
    return sorted(kept)


def snapshot(state: Any) -> Any:
    """A copy of ``state`` (a tree of dicts, lists and tuples) that training can no longer change: tensors
    copied to CPU, everything else deep-copied (training updates parameters and optimiser moments in place).

    CUDA tensors are copied without blocking, into the caching allocator's pinned host memory; the copy is
    ordered before any later kernel of the stream, and ``StateWriter`` waits for it before writing.
    """
    if isinstance(state, torch.Tensor):
        if state.is_cuda:
            return state.detach().to("cpu", non_blocking=True)
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return copy.deepcopy(state)


class CheckpointWriteError(TransferbenchError, RuntimeError):
    """A checkpoint write failed in the background (a full disk, a lost mount): the run cannot go on."""


class StateWriter:
    """Writes one checkpoint state at a time in a background thread, as ``state.pt.tmp`` renamed ``state.pt``.

    ``start`` returns at once with the write's future; the next ``start`` (and ``wait``) waits for the
    write before it, so at most one is in flight and the states reach the disk in order. A failed
    write is raised by ``wait`` (and the future) as ``CheckpointWriteError`` naming the file, never
    lost with the thread.
    """

    def __init__(self) -> None:
        self._pending: Future[Path] | None = None

    def start(self, directory: str | Path, state: Any) -> Future[Path]:
        """Write ``state`` (a ``snapshot``: nothing may change it while it is written) to ``directory``.

        Each write has a thread of its own that ends with it (not an idle pool thread, which the CLI's
        exit, joining every non-daemon thread, would wait for forever); it is not a daemon, so a process
        that ends normally finishes the write in flight first."""
        self.wait()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ready = None
        if torch.cuda.is_initialized():  # the snapshot's non-blocking copies from the GPU, on this stream
            ready = torch.cuda.Event()
            ready.record()
        future: Future[Path] = Future()

        def write() -> None:
            try:
                future.set_result(_write_state(directory / STATE_FILE, state, ready))
            except BaseException as exc:  # noqa: BLE001 -- handed to whoever waits for the future
                future.set_exception(exc)

        threading.Thread(target=write, name=f"checkpoint-writer {directory.name}").start()
        self._pending = future
        return future

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its ``CheckpointWriteError``."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _write_state(path: Path, state: Any, ready: torch.cuda.Event | None) -> Path:
    tmp = path.with_name(f"{STATE_FILE}.tmp")  # a resumed epoch may find a killed attempt's file
    try:
        if ready is not None:
            ready.synchronize()
        # through a file object: a full disk is then an OSError (ENOSPC), not torch's opaque RuntimeError
        with tmp.open("wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename: a crash then leaves no empty state.pt
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)  # the space a partial write took, back for the rerun
        reason = ("no space left on device; free space on its file system and rerun" if no_space(exc)
                  else f"{type(exc).__name__}: {exc}")
        raise CheckpointWriteError(f"writing checkpoint {path} failed: {reason}") from exc
    return path
