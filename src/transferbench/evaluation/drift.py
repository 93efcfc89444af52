"""The drift gate: does a new rank table tell the same story as the committed baseline?

Drift (the gate fails) is any of:
- a backbone's rank on a task changes;
- the families' average-rank order changes (families tied in average rank form one group);
- a task's mean metric moves by more than ``compare.metric_tolerance`` AND by more than the
  seeds' own spread (the larger of the two tables' std over seeds): a smaller move is reported
  but is noise at this number of seeds, unless it also changes a rank (then it is rank drift);
- the study, a task, its metric or a backbone is added or removed;
- a learning floor is not met (``compare.learning_floors``): on a task with a floor, the best
  backbone of some family scores below it (above it, for a lower-is-better metric). Ranks can
  hold while every backbone sits at chance; the floor catches a study that stopped learning.

An evaluation may hold a subset of the backbones (it ran only those): only a backbone that appears
on one side and not the other is structural drift, and a floor judges the families present. A
floor keyed by a multitask task applies to each of its component evaluations; a component with
no trivial baseline recorded is not checked against ``trivial`` (the report says so).

Ranks are always re-derived from the means (``ranking.rank_scores``) on both sides rather than
trusted from the file, so a hand-edited baseline mean is judged by what it implies; the report
says when a file's stored ranks disagree with its means. A missing or malformed baseline is an
error (``DriftError``), never a pass.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferbench.errors import TransferbenchError
from transferbench.evaluation.ranking import SCHEMA, family_order, rank_scores

# Moves smaller than this are float noise, not worth a line in the report.
_EPS = 1e-12


class DriftError(TransferbenchError):
    """The baseline (or new table) cannot be read or is not a rank table."""


@dataclass(frozen=True)
class Change:
    kind: str  # "floor", "rank", "family_order", "metric", "structure", "note"
    task: str
    subject: str  # backbone, family or key
    before: str
    after: str
    drift: bool
    why: str


# --------------------------------------------------------------------------- reading
def _expect(obj: Any, key: str, kind: type | tuple[type, ...], where: str, source: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise DriftError(f"{source}: not a rank table: missing key '{where}{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DriftError(f"{source}: key '{where}{key}' has the wrong type ({type(value).__name__})")
    return value


def validate_rank_table(table: Any, source: str) -> dict[str, Any]:
    """Check ``table`` has every key the gate reads; raise ``DriftError`` naming the first missing one."""
    if not isinstance(table, Mapping):
        raise DriftError(f"{source}: not a rank table: expected a JSON object, got {type(table).__name__}")
    schema = _expect(table, "schema", str, "", source)
    if schema != SCHEMA:
        raise DriftError(f"{source}: rank table schema {schema!r} is not {SCHEMA!r}; regenerate it")
    _expect(table, "study", str, "", source)
    _expect(table, "multi_task", Mapping, "", source)
    number = (int, float)
    backbones = _expect(table, "backbones", Mapping, "", source)
    for name, b in backbones.items():
        _expect(b, "family", str, f"backbones.{name}.", source)
    tasks = _expect(table, "tasks", Mapping, "", source)
    if not tasks:
        raise DriftError(f"{source}: not a rank table: 'tasks' is empty")
    for task, t in tasks.items():
        _expect(t, "metric", str, f"tasks.{task}.", source)
        _expect(t, "higher_is_better", bool, f"tasks.{task}.", source)
        cells = _expect(t, "backbones", Mapping, f"tasks.{task}.", source)
        for name, cell in cells.items():
            if name not in backbones:
                raise DriftError(f"{source}: tasks.{task}.backbones.{name} is not listed under 'backbones'")
            _expect(cell, "mean", number, f"tasks.{task}.backbones.{name}.", source)
            _expect(cell, "rank", number, f"tasks.{task}.backbones.{name}.", source)
            if cell.get("std") is not None:
                _expect(cell, "std", number, f"tasks.{task}.backbones.{name}.", source)
    return dict(table)


def load_rank_table(path: str | Path) -> dict[str, Any]:
    """Read and validate a rank-table JSON (a baseline or ``reports/rank_table.json``)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise DriftError(f"baseline {path} not found; after a reviewed run, commit its rank table as the "
                         f"baseline: cp reports/rank_table.json {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DriftError(f"{path}: not valid JSON: {exc}") from None
    return validate_rank_table(table, str(path))


# --------------------------------------------------------------------------- comparing
def derived_ranks(table: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per-task ranks implied by the table's means (not its stored ranks)."""
    return {task: rank_scores({b: c["mean"] for b, c in t["backbones"].items()},
                              higher_better=t["higher_is_better"])
            for task, t in table["tasks"].items()}


def _family_averages(table: Mapping[str, Any], ranks: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    families: dict[str, list[float]] = {}
    for name, b in table["backbones"].items():
        per_task = [r[name] for r in ranks.values() if name in r]
        if per_task:
            families.setdefault(b["family"], []).append(statistics.fmean(per_task))
    return {f: statistics.fmean(v) for f, v in families.items()}


def _order_text(order: list[list[str]]) -> str:
    return " before ".join(" = ".join(group) for group in order) or "(none)"


def _stale_rank_notes(table: Mapping[str, Any], ranks: Mapping[str, Mapping[str, float]], label: str) -> list[Change]:
    notes = []
    for task, t in table["tasks"].items():
        for name, cell in t["backbones"].items():
            if abs(cell["rank"] - ranks[task][name]) > _EPS:
                notes.append(Change("note", task, name, f"{cell['rank']:g}", f"{ranks[task][name]:g}", False,
                                    f"{label}'s stored rank disagrees with its means (hand-edited?); "
                                    "ranks re-derived from means"))
    return notes


def compare_rank_tables(baseline: Mapping[str, Any], current: Mapping[str, Any], *,
                        tolerance: float) -> list[Change]:
    """Everything that moved between ``baseline`` and ``current``; ``Change.drift`` marks what fails the gate."""
    changes: list[Change] = []
    if baseline["study"] != current["study"]:
        changes.append(Change("structure", "", "study", baseline["study"], current["study"], True,
                              "a different study; regenerate the baseline if intended"))
    old_ranks, new_ranks = derived_ranks(baseline), derived_ranks(current)
    changes += _stale_rank_notes(baseline, old_ranks, "baseline") + _stale_rank_notes(current, new_ranks, "new table")

    for task in sorted(set(baseline["tasks"]) | set(current["tasks"])):
        old, new = baseline["tasks"].get(task), current["tasks"].get(task)
        if old is None or new is None:
            changes.append(Change("structure", task, "task", "absent" if old is None else "present",
                                  "absent" if new is None else "present", True, "task added or removed"))
            continue
        if old["metric"] != new["metric"]:
            changes.append(Change("structure", task, "metric", old["metric"], new["metric"], True,
                                  "ranking metric changed"))
            continue
        for name in sorted(set(old["backbones"]) | set(new["backbones"])):
            a, b = old["backbones"].get(name), new["backbones"].get(name)
            if a is None or b is None:
                changes.append(Change("structure", task, name, "absent" if a is None else "present",
                                      "absent" if b is None else "present", True, "backbone added or removed"))
                continue
            rank_moved = abs(old_ranks[task][name] - new_ranks[task][name]) > _EPS
            if rank_moved:
                changes.append(Change("rank", task, name, f"{old_ranks[task][name]:g}",
                                      f"{new_ranks[task][name]:g}", True, "rank on this task changed"))
            delta = b["mean"] - a["mean"]
            if abs(delta) <= _EPS:
                continue
            spread = max(a.get("std") or 0.0, b.get("std") or 0.0)
            drift = abs(delta) > tolerance and abs(delta) > spread
            why = (f"moved {delta:+.4g} > tolerance {tolerance:g} and > seed std {spread:.4g}" if drift
                   else f"moved {delta:+.4g}: within " + ("tolerance" if abs(delta) <= tolerance else "seed std")
                   + f" (tolerance {tolerance:g}, seed std {spread:.4g})"
                   + ("; its rank change is drift" if rank_moved else ""))
            changes.append(Change("metric", task, name, f"{a['mean']:.4f}", f"{b['mean']:.4f}", drift, why))

    old_order = family_order(_family_averages(baseline, old_ranks))
    new_order = family_order(_family_averages(current, new_ranks))
    if old_order != new_order:
        changes.append(Change("family_order", "(all tasks)", "families", _order_text(old_order),
                              _order_text(new_order), True, "families' average-rank order changed"))
    return changes


def check_learning_floors(table: Mapping[str, Any], floors: Mapping[str, float | str]) -> list[Change]:
    """One line per (evaluation with a floor, family): the family's best backbone against the floor.

    A floor is a score, or ``"trivial"``: strictly better than the evaluation's trivial baseline (the
    table's ``trivial_baseline``: predicting the training mean for age, a random ranking for retrieval).
    Only the families present on an evaluation (that ran some of its backbones) are judged. A floor keyed
    by a multitask task applies to each of its component evaluations.
    """
    checks: list[Change] = []
    for key, floor in sorted(floors.items()):
        evaluations = _floor_evaluations(table, key)
        if not evaluations:  # dropping the task from the study is structural drift against the baseline
            checks.append(Change("floor", key, "(no family)", str(floor), "task not in this study", False,
                                 "not checked: the study does not run this task"))
        for task in evaluations:
            checks += _check_floor(table, task, floor)
    return checks


def _floor_evaluations(table: Mapping[str, Any], key: str) -> list[str]:
    """The evaluations a floor keyed ``key`` applies to: that evaluation, or each component of a multitask task."""
    if key in table["tasks"]:
        return [key]
    return [e for e, t in table["tasks"].items() if t.get("component") is not None and t.get("task") == key]


def _check_floor(table: Mapping[str, Any], task: str, floor: float | str) -> list[Change]:
    """One line per family present on ``task``: its best backbone against ``floor``."""
    t = table["tasks"][task]
    higher = t["higher_is_better"]
    trivial = floor == "trivial"
    if trivial:
        if t.get("trivial_baseline") is None and t.get("component") is not None:
            return [Change("floor", task, "(no family)", "trivial", "no trivial baseline", False,
                           f"not checked: the multi-task component {task} records no trivial baseline, so the "
                           "trivial floor does not apply")]
        if t.get("trivial_baseline") is None:
            return [Change("floor", task, "(no family)", "trivial", "no trivial baseline", True,
                           f"LEARNING FLOOR: {task}'s task kind records no trivial baseline to beat")]
        floor = float(t["trivial_baseline"])
    by_family: dict[str, list[tuple[float, str]]] = {}
    for name, cell in t["backbones"].items():
        by_family.setdefault(table["backbones"][name]["family"], []).append((cell["mean"], name))
    checks = []
    for family, scores in sorted(by_family.items()):
        pick = max if higher else min  # the first best in catalogue order on a tie
        best, name = pick(scores, key=lambda s: s[0])
        if trivial:
            met = best > floor if higher else best < floor
            bound = f"{'>' if higher else '<'} {floor:.4g} (trivial baseline)"
        else:
            met = best >= floor if higher else best <= floor
            bound = f"{'>=' if higher else '<='} {floor:g}"
        why = (f"best {family} backbone {name} meets the floor" if met else
               f"LEARNING FLOOR: the best {family} backbone ({name}) scores {best:.4f} {t['metric']}, "
               f"not {bound}: the study may have stopped learning")
        checks.append(Change("floor", task, family, bound, f"{best:.4f} ({name})", not met, why))
    return checks


def has_drift(changes: list[Change]) -> bool:
    return any(c.drift for c in changes)


def drift_markdown(changes: list[Change], *, baseline: str, tolerance: float) -> str:
    """A Markdown report of exactly what moved, and of the learning floors (terminal, $GITHUB_STEP_SUMMARY)."""
    drift = [c for c in changes if c.drift]
    moves = [c for c in changes if c.kind != "floor"]
    floors = [c for c in changes if c.kind == "floor"]
    lines = [f"## Rank drift against baseline `{baseline}`", ""]
    if drift:
        lines.append(f"**DRIFT: {len(drift)} change(s) fail the gate** (metric tolerance {tolerance:g}).")
    else:
        unchecked = sum(1 for c in floors if c.subject == "(no family)")  # floors that did not apply
        met = "" if not floors else ", and every learning floor is met" if not unchecked else \
            f", and every learning floor checked is met ({unchecked} not checked, see below)"
        lines.append(f"**No drift**: every rank and the family order match the baseline "
                     f"(metric tolerance {tolerance:g}){met}.")
    if not moves:
        lines += ["", "Nothing moved."]
    else:
        lines += ["", "| drift | kind | task | backbone / item | baseline | now | why |",
                  "|---|---|---|---|---|---|---|"]
        order = {"structure": 0, "rank": 1, "family_order": 2, "metric": 3, "note": 4}
        for c in sorted(moves, key=lambda c: (not c.drift, order[c.kind], c.task, c.subject)):
            lines.append(f"| {'**yes**' if c.drift else 'no'} | {c.kind} | {c.task} | `{c.subject}` | {c.before} | "
                         f"{c.after} | {c.why} |")
    if floors:
        lines += ["", "### Learning floors", "", "| met | task | family | floor | best backbone | why |",
                  "|---|---|---|---|---|---|"]
        for c in floors:
            met = "no: **fails the gate**" if c.drift else "not checked" if c.subject == "(no family)" else "yes"
            lines.append(f"| {met} | {c.task} | {c.subject} | "
                         f"{c.before} | {c.after} | {c.why} |")
    return "\n".join(lines) + "\n"
