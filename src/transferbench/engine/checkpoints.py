"""The run directory's checkpoints: the newest complete one (local mode's resume) and pruning.

Rank 0 writes each epoch's state as ``epoch_NNNN/state.pt.tmp`` and renames it ``state.pt`` when
complete, so a checkpoint being written when the process died is never taken for a complete one.
With Ray Train worker actors, Ray Train keeps the checkpoint state; local mode keeps none across
processes, so a rerun looks here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from transferbench.engine.spec import STATE_FILE, checkpoint_name

logger = logging.getLogger(__name__)
_PREFIX = checkpoint_name(0)[:-4]  # "epoch_"


def epoch_of(directory: Path) -> int | None:
    digits = directory.name[len(_PREFIX):]
    return int(digits) if directory.name.startswith(_PREFIX) and digits.isdigit() else None


def load_state(directory: str | Path) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain values only: ``weights_only``)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest complete checkpoint's state in ``run_dir``, or None.

    Only ``state.pt`` counts. A ``state.pt`` that does not load (truncated by a full disk or a crash
    of the machine) is skipped with a warning naming it, and the one before it is used.
    """
    epochs = sorted(((e, d) for d in Path(run_dir).glob(_PREFIX + "*") if (e := epoch_of(d)) is not None),
                    reverse=True)
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
