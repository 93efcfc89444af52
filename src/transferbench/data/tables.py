"""Reading CSV tables strictly: a malformed file or a missing column is a ``DataError`` naming
the file (and, where pandas can tell, the line), never a silently shortened table.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from transferbench.errors import DataError


def read_csv_strict(path: str | Path, *, required: Iterable[str] = (), what: str = "table") -> pd.DataFrame:
    """Every cell as a string ('' for empty); unnamed trailing columns (a trailing comma) dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, on_bad_lines="error",
                            encoding="utf-8", encoding_errors="replace")
    except pd.errors.ParserError as exc:
        raise DataError(f"malformed CSV {path}: {exc}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"malformed CSV {path}: the file is empty (no header)") from None
    frame = frame.loc[:, [c for c in frame.columns if not str(c).startswith("Unnamed:")]]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"malformed CSV {path}: missing required columns {missing} "
                        f"(found {list(frame.columns)})")
    return frame
