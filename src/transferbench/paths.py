"""Names every layer shares: the split names and where the offline data mirror is.

On-disk paths are derived from ``params.yaml`` (``data`` section) and the working directory the
command runs in, by the code that owns them (``data.layout`` for splits), never from ``__file__``,
so an installed package works too.
"""

from __future__ import annotations

import os
from pathlib import Path

MIRROR_ENV = "TRANSFERBENCH_DATA_MIRROR"
SPLITS = ("train", "val", "test")


def mirror_root() -> Path | None:
    """The offline mirror directory named by $TRANSFERBENCH_DATA_MIRROR, if set."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else None
