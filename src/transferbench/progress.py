"""Progress bars for the long, silent steps (downloads, checksums, image caches, epochs, trials, features).

One wrapper around ``tqdm``, on stderr. A bar draws only when stderr is a terminal: in CI, in
``dvc repro`` logs and in Ray workers (whose output is piped) it is disabled and writes nothing, so
logs keep their lines and no carriage returns. ``$TRANSFERBENCH_PROGRESS`` overrides the check:
``0`` never draws a bar, ``1`` always does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

PROGRESS_ENV = "TRANSFERBENCH_PROGRESS"


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether bars draw on ``stream`` (default stderr): ``$TRANSFERBENCH_PROGRESS`` if 0/1, else a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable[Any] | None = None, *, desc: str, total: float | None = None, unit: str = "it",
             bytes: bool = False, leave: bool = False, initial: float = 0, disable: bool = False,
             file: IO[str] | None = None) -> tqdm:
    """A ``tqdm`` bar on ``file`` (default stderr), drawn only where ``enabled``; ``disable`` turns it off too
    (e.g. on ranks other than 0). ``bytes``: counts bytes, shown scaled (KiB, MiB) with the speed.

    A disabled bar is a no-op: iterating it yields ``iterable``'s items, ``update`` and ``close`` do nothing.
    """
    stream = sys.stderr if file is None else file
    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, file=stream,
                disable=disable or not enabled(stream), dynamic_ncols=True,
                unit="B" if bytes else unit, unit_scale=bytes, unit_divisor=1024 if bytes else 1000)
