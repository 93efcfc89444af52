"""The study report as one self-contained HTML file: every figure inlined as a PNG data URI, styles inline.

No CDN, no script, no network: the page opens from disk and is the same file MLflow keeps as the study
parent run's artifact. The template (``templates/report.html.j2``) is Jinja2 with autoescaping; the
stage (``stages/report.py``) gathers what it shows, this module renders it and draws the report's own
figures (learning curves per evaluation, the Spearman heat-map between evaluations' rankings).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape  # noqa: E402

TEMPLATE = "report.html.j2"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def file_data_uri(path: Path) -> str:
    return png_data_uri(Path(path).read_bytes())


def figure_data_uri(fig: Any) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png_data_uri(buffer.getvalue())


def learning_curves_figure(curves: Mapping[tuple[str, int], pd.DataFrame], *, title: str) -> str | None:
    """Val (solid) and train (dotted) loss per epoch of every (backbone, seed): one colour per backbone (None: no
    curves)."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(b for b, _ in curves))}
    for (backbone, seed), frame in sorted(curves.items()):
        ax.plot(frame["epoch"], frame["val_loss"], color=colours[backbone], alpha=0.85,
                label=f"{backbone} s{seed} val")
        if "train_loss" in frame:
            ax.plot(frame["epoch"], frame["train_loss"], color=colours[backbone], alpha=0.4, linestyle=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (val solid, train dotted)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    return figure_data_uri(fig)


def correlation_figure(correlations: Mapping[str, Mapping[str, float | None]], *, title: str) -> str | None:
    """Heat-map of the Spearman correlation between evaluations' backbone rankings (blank: not defined)."""
    names = list(correlations)
    if len(names) < 2:
        return None
    values = [[math.nan if correlations[a].get(b) is None else correlations[a][b] for b in names] for a in names]
    size = 2.5 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(values, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, label="Spearman rho")
    ax.set_title(title, fontsize=9)
    return figure_data_uri(fig)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def _rank(value: Any) -> str:
    return "n/a" if value is None else f"{value:g}"


def render_report(context: Mapping[str, Any]) -> str:
    """The report page for ``context`` (built by ``stages.report``)."""
    env = Environment(loader=PackageLoader("transferbench.evaluation", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _fmt
    env.filters["rank"] = _rank
    return env.get_template(TEMPLATE).render(**context)


def group_rows(table: Mapping[str, Any], evaluations: Sequence[str],
               average_rank: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """One row per backbone for a group's evaluations: its cells (None: not run) and its average rank there
    (the rank table's own), best first."""
    rows = []
    for backbone, info in table["backbones"].items():
        rows.append({"backbone": backbone, "family": info["family"], "weights": info["weights_label"],
                     "cells": [table["tasks"][e]["backbones"].get(backbone) for e in evaluations],
                     "average_rank": average_rank.get(backbone)})
    return sorted(rows, key=lambda r: (r["average_rank"] is None, r["average_rank"] or 0, r["backbone"]))
