"""Atomic writes: every file the data stages produce appears whole or not at all.

A crash or a failed check never leaves a half-written manifest, summary or report
behind: content goes to a temporary sibling first and is then
renamed over the target, which POSIX makes atomic on one file system. A directory of
outputs (one task's split) is built in a temporary sibling directory and swapped in.
A write that finds the file system full raises ``DiskFullError`` naming the target, and
leaves the previous file (or directory) in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from transferbench.errors import TransferbenchError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(TransferbenchError):
    """A write found no space left on its file system (or a quota reached): ``path`` is what it was writing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(f"writing {self.path}: no space left on device; free space on its file system and rerun")


def no_space(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full file system's (ENOSPC, EDQUOT)."""
    while exc is not None:
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in _NO_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise DiskFullError(target) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, payload: Any) -> None:
    write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(target: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def copy_file(source: str | Path, target: str | Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``target`` as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        try:
            yield tmp
        except DiskFullError as exc:
            raise DiskFullError(_final_name(exc.path, tmp, target)) from exc
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            raise DiskFullError(_final_name(Path(exc.filename), tmp, target) if exc.filename else target) from exc
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _final_name(path: Path, tmp: Path, target: Path) -> Path:
    """``path`` in ``atomic_directory``'s temporary directory ``tmp``, named as it would be in ``target``."""
    return target / path.relative_to(tmp) if path.is_relative_to(tmp) else path
