"""The rank table as files: Markdown for people, CSV and JSON for tools, PNGs for ``dvc plots``.

All four carry the same numbers (the JSON is the rank table itself; the CSV is its long form).
The JSON is a DVC metric, so ``dvc metrics diff`` shows ranks and means moving between commits.
A backbone that did not run an evaluation (``tasks.<task>.backbones``) has no cell there: "—" in
Markdown, no CSV row, a blank square in the heat-map.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

CSV_COLUMNS = ("scope", "task", "mode", "group", "metric", "backbone", "family", "weights", "imagenet_top1",
               "mean", "std", "n_seeds", "rank")


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _rank(value: float) -> str:
    return f"{value:g}" if value == int(value) or value * 2 == int(value * 2) else f"{value:.2f}"


def _average(value: float | None, bold: bool = False) -> str:
    """An average rank; "n/a" for a backbone or family that ran none of the evaluations averaged."""
    if value is None:
        return "n/a"
    return f"**{value:.2f}**" if bold else f"{value:.2f}"


def _by_average_rank(items: dict[str, Any]) -> list[tuple[str, Any]]:
    """Entries best average rank first; those without one last."""
    return sorted(items.items(), key=lambda kv: (kv[1]["average_rank"] is None, kv[1]["average_rank"] or 0, kv[0]))


NOT_RUN = "—"


def rank_table_markdown(table: dict[str, Any]) -> str:
    """The paper-style table: backbones x tasks with mean ± std (rank), then family ranks."""
    tasks, backbones, families = table["tasks"], table["backbones"], table["families"]
    lines = [f"# Rank table: study `{table['study']}`", ""]
    labels = sorted({b["weights_label"] for b in backbones.values()})
    if any(b["weights"] != "hub" for b in backbones.values()):
        # file: weights are pretrained too (e.g. hub weights imported offline): only random init voids the ranks.
        caveat = ("; random-init ranks say nothing about pretrained transfer"
                  if any(b["weights"] == "none" for b in backbones.values()) else "")
        lines += [f"**Weights: {', '.join(labels)}.** Backbones not initialised from timm's hub weights are marked "
                  f"in every row{caveat}.", ""]
    lines += ["Per evaluation (a task in one mode: `task` = full fine-tuning or retrieval, `task:linear_probe` = "
              "linear evaluation, `multitask/component` = one component of a multi-task model): mean ± std of the "
              "test metric over seeds, (rank). Rank 1 is best; ties share the average rank; ↓ marks lower-is-better "
              f"metrics (ranked ascending); {NOT_RUN} = the evaluation does not run that backbone (it ranks those "
              "it runs, and a backbone's average rank is over the evaluations it ran).", ""]
    for name, t in tasks.items():
        if t.get("n_note"):
            lines.append(f"- `{name}`: {t['n_note']}.")
        if t.get("trivial_baseline") is not None:
            lines.append(f"- `{name}`: trivial baseline ({t.get('trivial_baseline_is')}, ignoring the image) "
                         f"{t['metric']} {_num(t['trivial_baseline'])}.")
    if any(t.get("n_note") or t.get("trivial_baseline") is not None for t in tasks.values()):
        lines.append("")
    header = ["backbone", "family", "weights", "ImageNet top-1"]
    header += [f"{t} ({v['metric']}{'' if v['higher_is_better'] else ' ↓'})" for t, v in tasks.items()]
    header += ["average rank"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, b in _by_average_rank(backbones):
        row = [f"`{name}`", b["family"], b["weights_label"],
               "n/a" if b["imagenet_top1"] is None else f"{b['imagenet_top1']:.1f}"]
        for task in tasks.values():
            cell = task["backbones"].get(name)
            row.append(NOT_RUN if cell is None else
                       f"{_num(cell['mean'])} ± {_num(cell['std'])} ({_rank(cell['rank'])})")
        row.append(_average(b["average_rank"], bold=True))
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Families", "",
              "Per task: mean rank of the family's backbones. Average rank: mean of its backbones' average ranks.",
              ""]
    header = ["family", "backbones"] + list(tasks) + ["average rank"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, f in _by_average_rank(families):
        row = [name, ", ".join(f"`{b}`" for b in f["backbones"])]
        row += [f"{task['family_rank'][name]:.2f}" if name in task["family_rank"] else NOT_RUN
                for task in tasks.values()]
        row.append(_average(f["average_rank"], bold=True))
        lines.append("| " + " | ".join(row) + " |")
    order = " before ".join(" = ".join(group) for group in table["family_order"])
    lines += ["", f"Family order (best first): {order}.", ""]
    lines += _groups_markdown(table)
    lines += _gain_markdown(table)
    lines += _multi_task_markdown(table)
    lines += ["## Significance across tasks", ""]
    lines += _significance_markdown(table["significance"])
    return "\n".join(lines) + "\n"


def _groups_markdown(table: dict[str, Any]) -> list[str]:
    """The paper's task groups: per-backbone and per-family average rank within each group."""
    groups = table.get("groups") or {}
    if not groups:
        return []
    names = list(table["backbones"])
    families = sorted(table["families"])
    lines = ["## By task group (the paper's tables)", "",
             "Average rank within each group (1 = best). Linear-probe results form the linear evaluation group.", ""]
    header = ["group", "evaluations"] + [f"`{b}`" for b in names] + [f"{f} (family)" for f in families]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, g in groups.items():
        row = [group, ", ".join(f"`{e}`" for e in g["evaluations"])]
        row += [_average(g["backbones"][b]) for b in names]
        row += [_average(g["families"][f], bold=True) for f in families]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _gain_markdown(table: dict[str, Any]) -> list[str]:
    """Paper Table 7's reading: what whole-network fine-tuning gains over a linear probe, per backbone and family."""
    gains = table.get("gain_from_full_finetuning") or {}
    if not gains:
        return []
    lines = ["## Gain from full fine-tuning over linear evaluation", "",
             "Per task run in both modes: test metric of full fine-tuning minus that of the linear probe on the frozen "
             "backbone, paired by seed (positive: full fine-tuning is better; for ↓ metrics, the reduction), "
             "mean ± std over seeds; per family over its backbones' seeds.", ""]
    header = ["task", "metric"] + [f"`{b}`" for b in table["backbones"]] + \
        [f"{f} (family)" for f in sorted(table["families"])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, g in gains.items():
        row = [f"`{task}`", g["metric"] + ("" if g["higher_is_better"] else " ↓")]
        row += [f"{_num(g['backbones'][b]['mean'])} ± {_num(g['backbones'][b]['std'])}"
                if b in g["backbones"] else "n/a" for b in table["backbones"]]
        row += [f"**{_num(g['families'][f]['mean'])} ± {_num(g['families'][f]['std'])}**"
                if f in g["families"] else "n/a" for f in sorted(table["families"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _change(cell: dict[str, Any] | None, bold: bool = False) -> str:
    """A relative change (%), signed, mean ± std; "n/a" when undefined."""
    if cell is None:
        return "n/a"
    text = f"{round(cell['mean'], 2) + 0.0:+.2f} ± {_num(cell['std'], 2)}"  # + 0.0: no "-0.00"
    return f"**{text}**" if bold else text


def _multi_task_markdown(table: dict[str, Any]) -> list[str]:
    """Paper Tables 9-13: per multi-task model and component, performance, relative change (%) and rank."""
    multi = table.get("multi_task") or {}
    if not multi:
        return []
    lines = ["## Multi-task (paper Tables 9–13)", "",
             "Per multi-task model and component: performance = the component's test metric, mean ± std over "
             "seeds; relative change (%) over single-task training of the same backbone, paired by seed: "
             "100·(multi − single)/|single| (for ↓ metrics, 100·(single − multi)/|single|), so **positive means the "
             "multi-task model is better**, mean ± std over seeds (per family: over its backbones' seeds); rank by "
             "performance among the backbones the model ran.", ""]
    backbones, families = table["backbones"], sorted(table["families"])
    for task, entry in multi.items():
        components, routing = entry["components"], entry.get("routing_accuracy")
        header = ["backbone", "family"]
        for component, c in components.items():
            header += [f"`{component}` {c['metric']}{'' if c['higher_is_better'] else ' ↓'}",
                       "relative change (%)", "rank"]
        header += ["routing accuracy"] if routing else []
        lines += [f"### `{task}`", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        notes = []
        for name in backbones:
            if not any(name in c["backbones"] for c in components.values()):
                continue
            row = [f"`{name}`", backbones[name]["family"]]
            for component, c in components.items():
                cell = c["backbones"].get(name)
                if cell is None:
                    row += [NOT_RUN] * 3
                    continue
                perf = cell["performance"]
                row += [f"{_num(perf['mean'])} ± {_num(perf['std'])}", _change(cell["relative_change"]),
                        _rank(cell["rank"])]
                if cell.get("note"):
                    notes.append(f"- `{name}` on `{component}`: {cell['note']}.")
            if routing:
                r = routing.get(name)
                row.append(NOT_RUN if r is None else f"{_num(r['mean'])} ± {_num(r['std'])}")
            lines.append("| " + " | ".join(row) + " |")
        for family in families:
            row = [f"{family} (family)", ""]
            for c in components.values():
                row += ["", _change(c["families"].get(family), bold=True), ""]
            lines.append("| " + " | ".join(row + ([""] if routing else [])) + " |")
        lines += ([""] + notes if notes else []) + [""]
    return lines


def _significance_markdown(sig: dict[str, Any]) -> list[str]:
    left_out = sig.get("left_out") or {}
    note = [] if not left_out else [
        "Left out of the test, which needs every backbone on every evaluation: "
        + ", ".join(f"`{e}` ({why})" for e, why in left_out.items()) + ".", ""]
    if not sig["applies"]:
        return note + [f"The Friedman test does not apply: {sig['reason']}."]
    verdict = "significant" if sig["significant"] else "not significant"
    lines = note + [f"Friedman test over {sig['n_tasks']} tasks and {sig['n_backbones']} backbones: "
             f"χ² = {sig['statistic']:.3f}, p = {sig['p_value']:.4g} ({verdict} at α = {sig['alpha']}).",
             f"Nemenyi critical difference: {sig['critical_difference']:.3f} average ranks "
             "(see rank_cd_diagram.png).", ""]
    pairs = sorted({tuple(sorted((a, b))) for a, row in sig["pairwise_p"].items() for b in row})
    significant = [f"`{a}` vs `{b}` (p = {sig['pairwise_p'][a][b]:.4g})" for a, b in pairs
                   if sig["pairwise_p"][a][b] < sig["alpha"]]
    lines.append("Significantly different pairs (Nemenyi): " + (", ".join(significant) or "none") + ".")
    return lines


def rank_table_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The rank table in long form, one row per number (CSV)."""
    rows = []
    backbones = table["backbones"]
    for task, t in table["tasks"].items():
        for name, cell in t["backbones"].items():  # the backbones the evaluation ran
            b = backbones[name]
            rows.append({"scope": "task", "task": task, "mode": t.get("mode"), "group": t.get("group"),
                         "metric": t["metric"], "backbone": name,
                         "family": b["family"], "weights": b["weights"], "imagenet_top1": b["imagenet_top1"],
                         "mean": cell["mean"], "std": cell["std"], "n_seeds": cell["n_seeds"], "rank": cell["rank"]})
        for family, rank in t["family_rank"].items():
            rows.append({"scope": "task_family", "task": task, "metric": t["metric"], "family": family,
                         "rank": rank})
    for name, b in backbones.items():
        rows.append({"scope": "average", "backbone": name, "family": b["family"], "weights": b["weights"],
                     "imagenet_top1": b["imagenet_top1"], "rank": b["average_rank"]})
    for family, f in table["families"].items():
        rows.append({"scope": "family_average", "family": family, "rank": f["average_rank"]})
    for group, g in (table.get("groups") or {}).items():  # no row for a backbone that ran none of the group
        rows += [{"scope": "group", "group": group, "backbone": b, "family": backbones[b]["family"], "rank": r}
                 for b, r in g["backbones"].items() if r is not None]
        rows += [{"scope": "group_family", "group": group, "family": f, "rank": r} for f, r in g["families"].items()
                 if r is not None]
    for task, g in (table.get("gain_from_full_finetuning") or {}).items():
        rows += [{"scope": "gain_full_minus_linear", "task": task, "metric": g["metric"], "backbone": b,
                  "family": backbones[b]["family"], "mean": c["mean"], "std": c["std"], "n_seeds": c["n_seeds"]}
                 for b, c in g["backbones"].items()]
        rows += [{"scope": "gain_full_minus_linear_family", "task": task, "metric": g["metric"], "family": f,
                  "mean": c["mean"], "std": c["std"], "n_seeds": c["n"]} for f, c in g["families"].items()]
    rows += _multi_task_rows(table)
    return [{c: row.get(c) for c in CSV_COLUMNS} for row in rows]


def _multi_task_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The multi-task table in long form: performance (and rank) and relative change (%) per backbone, the
    relative change per family, routing accuracy per backbone; ``task`` is the component evaluation's id."""
    rows: list[dict[str, Any]] = []
    backbones = table["backbones"]
    for task, entry in (table.get("multi_task") or {}).items():
        for c in entry["components"].values():
            base = {"task": c["evaluation"], "mode": "full", "group": "multi-task", "metric": c["metric"]}
            for name, cell in c["backbones"].items():
                b = {"backbone": name, "family": backbones[name]["family"]}
                perf = cell["performance"]
                rows.append({**base, **b, "scope": "multi_task_performance", "mean": perf["mean"], "std": perf["std"],
                             "n_seeds": perf["n_seeds"], "rank": cell["rank"]})
                if cell["relative_change"] is not None:
                    change = cell["relative_change"]
                    rows.append({**base, **b, "scope": "multi_task_relative_change_pct", "mean": change["mean"],
                                 "std": change["std"], "n_seeds": change["n_seeds"]})
            rows += [{**base, "scope": "multi_task_relative_change_pct_family", "family": f, "mean": v["mean"],
                      "std": v["std"], "n_seeds": v["n"]} for f, v in c["families"].items()]
        rows += [{"scope": "multi_task_routing_accuracy", "task": task, "mode": "full", "group": "multi-task",
                  "metric": "routing_accuracy", "backbone": name, "family": backbones[name]["family"],
                  "mean": r["mean"], "std": r["std"], "n_seeds": r["n_seeds"]}
                 for name, r in (entry.get("routing_accuracy") or {}).items()]
    return rows


def rank_table_csv(table: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in rank_table_rows(table))
    return out.getvalue()


def _weights_note(table: dict[str, Any], backbone: str) -> str:
    """'' for hub weights, else the honest label (e.g. 'none (random init)') shown beside the name."""
    entry = table["backbones"][backbone]
    return "" if entry["weights"] == "hub" else entry["weights_label"]


def _title_suffix(table: dict[str, Any]) -> str:
    notes = sorted({_weights_note(table, b) for b in table["backbones"]} - {""})
    return f" (weights: {', '.join(notes)})" if notes else ""


def plot_rank_heatmap(table: dict[str, Any], path: Path) -> None:
    """Tasks x backbones heat-map of ranks (1 = best, darker), backbones by average rank; blank: not run."""
    order = [b for b, _ in _by_average_rank(table["backbones"])]
    ranks = pd.DataFrame({b: [t["backbones"][b]["rank"] if b in t["backbones"] else math.nan
                              for t in table["tasks"].values()] for b in order},
                         index=list(table["tasks"]), dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(order), 1.4 + 0.6 * len(ranks)))
    image = ax.imshow(ranks.to_numpy(), cmap="viridis_r", vmin=1, vmax=max(len(order), 2), aspect="auto")
    ticks = [f"{b}\n({'; '.join(filter(None, [table['backbones'][b]['family'], _weights_note(table, b)]))})"
             for b in order]
    ax.set_xticks(range(len(order)), ticks,
                  rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(ranks)), list(ranks.index), fontsize=8)
    for i, row in enumerate(ranks.to_numpy()):
        for j, value in enumerate(row):
            if math.isnan(value):
                continue
            ax.text(j, i, _rank(value), ha="center", va="center", color="black" if value < len(order) / 2 + 1
                    else "white", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank (1 = best)")
    ax.set_title(f"Per-task rank, study {table['study']}{_title_suffix(table)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cd_diagram(table: dict[str, Any], path: Path) -> None:
    """Nemenyi critical-difference diagram, or a figure saying why the test does not apply.

    Drawn from the average ranks over the evaluations the test used (those that ran every backbone).
    Always written, so the DVC stage's declared plot exists whatever the number of tasks.
    """
    import scikit_posthocs as sp

    sig = table["significance"]
    fig, ax = plt.subplots(figsize=(7, 2.5))
    if sig["applies"]:
        names = list(table["backbones"])
        matrix = pd.DataFrame(1.0, index=names, columns=names)
        for a, row in sig["pairwise_p"].items():
            for b, p in row.items():
                matrix.loc[a, b] = p
        ranks = pd.Series({b: sig["average_ranks"][b] for b in names})
        sp.critical_difference_diagram(ranks, matrix, alpha=sig["alpha"], cd=sig["critical_difference"], ax=ax)
        ax.set_title(f"Average rank, Nemenyi CD = {sig['critical_difference']:.2f} (α = {sig['alpha']})"
                     f"{_title_suffix(table)}",
                     fontsize=9, pad=24)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "Friedman / Nemenyi test does not apply:\n" + sig["reason"], ha="center", va="center",
                wrap=True, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


REPORT_FILES = {"markdown": "rank_table.md", "csv": "rank_table.csv", "json": "rank_table.json",
                "heatmap": "rank_heatmap.png", "cd_diagram": "rank_cd_diagram.png"}


def rank_metrics(table: Mapping[str, Any]) -> dict[str, Any]:
    """The rank table's numbers for ``dvc metrics show`` / ``diff``: per family and backbone the average rank (1 =
    best), the number of evaluations, and the Friedman test's p-value (null where it does not apply)."""
    significance = table["significance"]
    return {"average_rank": {"families": {f: v["average_rank"] for f, v in table["families"].items()},
                             "backbones": {b: v["average_rank"] for b, v in table["backbones"].items()}},
            "n_evaluations": len(table["tasks"]),
            "friedman_p_value": significance.get("p_value") if significance.get("applies") else None}


def write_rank_reports(table: dict[str, Any], reports_dir: str | Path) -> dict[str, Path]:
    """Write every rank-table file under ``reports_dir``; returns what was written, by kind."""
    out = Path(reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    paths["markdown"].write_text(rank_table_markdown(table))
    paths["csv"].write_text(rank_table_csv(table))
    paths["json"].write_text(json.dumps(table, indent=2, allow_nan=False) + "\n")
    plot_rank_heatmap(table, paths["heatmap"])
    plot_cd_diagram(table, paths["cd_diagram"])
    return paths
