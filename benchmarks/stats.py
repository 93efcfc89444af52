"""Median and spread of repeated measurements: every figure of the report is one ``Summary``."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median, min, max and count of one measured quantity (``n`` = 0: nothing measured)."""

    median: float | None
    min: float | None
    max: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        values = [float(v) for v in values]
        if not values:
            return cls(None, None, None, 0)
        return cls(statistics.median(values), min(values), max(values), len(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, digits: int = 1) -> str:
        """``median [min-max] (n)`` for the Markdown tables; ``-`` when not measured."""
        if self.median is None:
            return "-"
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.min:.{digits}f}-{self.max:.{digits}f}] (n={self.n})"
