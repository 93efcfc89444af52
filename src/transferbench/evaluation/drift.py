"""The drift gate: does a new rank table tell the same story as the committed baseline?

Drift (the gate fails) is any of:
- a backbone's rank on a task changes;
- the families' average-rank order changes (families tied in average rank form one group);
- a task's mean metric moves by more than ``compare.metric_tolerance`` AND by more than the
  seeds' own spread (the larger of the two tables' std over seeds): a smaller move is reported
  but is noise at this number of seeds, unless it also changes a rank (then it is rank drift);
- the study's structure changes: the study is renamed, an evaluation or a backbone (of the study or
  of an evaluation) is added or removed, a backbone changes family, an evaluation's metric or its
  direction changes. Each is one explicit ``structure`` line of the report;
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
error (``DriftError``, naming the file and the key at fault), never a pass: ``RankTableSchema`` is
what the gate reads of a rank table, checked before anything is compared.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

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
class _Schema(BaseModel):
    # Strict: JSON's true is not a number and "1" not a rank. Keys the gate does not read are ignored.
    model_config = ConfigDict(strict=True, frozen=True, allow_inf_nan=False)


class CellSchema(_Schema):
    """One backbone on one evaluation: its mean over seeds, the std over seeds (none for n = 1), its rank."""

    mean: float
    std: float | None = None
    rank: float


class EvaluationSchema(_Schema):
    """One evaluation (a rank-table column): its metric, the metric's direction and its ranked backbones."""

    metric: str = Field(min_length=1)
    higher_is_better: bool
    backbones: dict[str, CellSchema] = Field(min_length=1)


class BackboneSchema(_Schema):
    family: str = Field(min_length=1)


class RankTableSchema(_Schema):
    """What the gate reads of a rank table (``ranking.rank_table``); the ``schema`` version is checked first.

    Every evaluation ranks backbones listed under ``backbones``, each within 1..n (n: the backbones the
    evaluation ran; ties share the average rank).
    """

    study: str = Field(min_length=1)
    multi_task: dict[str, Any]
    backbones: dict[str, BackboneSchema] = Field(min_length=1)
    tasks: dict[str, EvaluationSchema] = Field(min_length=1)

    @model_validator(mode="after")
    def _ranks_listed_backbones_within_1_to_n(self) -> RankTableSchema:
        for task, t in self.tasks.items():
            n = len(t.backbones)
            for name, cell in t.backbones.items():
                if name not in self.backbones:
                    raise _invalid(f"tasks.{task}.backbones.{name}", "is not listed under 'backbones'")
                if not 1 <= cell.rank <= n:
                    raise _invalid(f"tasks.{task}.backbones.{name}.rank",
                                   f"{cell.rank:g} is not within 1..{n} (the evaluation ranks {n} backbones)")
        return self


def _invalid(key: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("rank_table", "{message}", {"key": key, "message": message})


def _schema_error(error: Mapping[str, Any], source: str) -> DriftError:
    key, kind, value = ".".join(str(part) for part in error["loc"]), error["type"], error.get("input")
    if kind == "rank_table":
        return DriftError(f"{source}: key '{error['ctx']['key']}': {error['ctx']['message']}")
    if kind == "missing":
        return DriftError(f"{source}: not a rank table: missing key '{key}'")
    if kind == "too_short":
        return DriftError(f"{source}: not a rank table: key '{key}' is empty")
    if kind.endswith("_type"):
        return DriftError(f"{source}: key '{key}' has the wrong type ({type(value).__name__})")
    return DriftError(f"{source}: key '{key}': {error['msg']} (got {value!r})")


def validate_rank_table(table: Any, source: str) -> dict[str, Any]:
    """Check ``table`` against ``RankTableSchema``; raise ``DriftError`` naming ``source`` and the key at fault."""
    if not isinstance(table, Mapping):
        raise DriftError(f"{source}: not a rank table: expected a JSON object, got {type(table).__name__}")
    if "schema" not in table:
        raise DriftError(f"{source}: not a rank table: missing key 'schema'")
    if table["schema"] != SCHEMA:  # an old table lacks keys: say so before naming one
        raise DriftError(f"{source}: rank table schema {table['schema']!r} is not {SCHEMA!r}; regenerate it")
    try:
        RankTableSchema.model_validate(table)
    except ValidationError as exc:
        raise _schema_error(exc.errors()[0], source) from None
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


def _presence(old: Mapping[str, Any], name: str, what: str, where: str) -> tuple[str, str, str]:
    """(before, after, why) for ``name``, a ``what`` in exactly one of ``old`` and the new table's ``where``."""
    if name in old:
        return "present", "absent", f"{what} removed from {where}"
    return "absent", "present", f"{what} added to {where}"


def _direction(evaluation: Mapping[str, Any]) -> str:
    return "higher is better" if evaluation["higher_is_better"] else "lower is better"


def _structure_changes(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """One ``structure`` line (always drift) per change of what the study is, rather than of what it scored."""
    changes: list[Change] = []

    def structure(task: str, subject: str, before: str, after: str, why: str) -> None:
        changes.append(Change("structure", task, subject, before, after, True, why))

    if baseline["study"] != current["study"]:
        structure("(study)", "study", baseline["study"], current["study"],
                  "study renamed: a different study; regenerate the baseline if intended")
    old_backbones, new_backbones = baseline["backbones"], current["backbones"]
    for name in sorted(set(old_backbones) ^ set(new_backbones)):
        structure("(study)", name, *_presence(old_backbones, name, "backbone", "the study"))
    for name in sorted(set(old_backbones) & set(new_backbones)):
        if old_backbones[name]["family"] != new_backbones[name]["family"]:
            structure("(study)", name, old_backbones[name]["family"], new_backbones[name]["family"],
                      "backbone's family changed")
    old_tasks, new_tasks = baseline["tasks"], current["tasks"]
    for task in sorted(set(old_tasks) | set(new_tasks)):
        if task not in old_tasks or task not in new_tasks:
            structure(task, "evaluation", *_presence(old_tasks, task, "evaluation", "the study"))
            continue
        old, new = old_tasks[task], new_tasks[task]
        if old["metric"] != new["metric"]:
            structure(task, "metric", old["metric"], new["metric"], "ranking metric changed; ranks not compared")
        if old["higher_is_better"] != new["higher_is_better"]:
            structure(task, "higher_is_better", _direction(old), _direction(new),
                      "metric direction changed; ranks not compared")
        for name in sorted(set(old["backbones"]) ^ set(new["backbones"])):
            structure(task, name, *_presence(old["backbones"], name, "backbone", "this evaluation"))
    return changes


def compare_rank_tables(baseline: Mapping[str, Any], current: Mapping[str, Any], *,
                        tolerance: float) -> list[Change]:
    """Everything that moved between ``baseline`` and ``current``; ``Change.drift`` marks what fails the gate."""
    changes = _structure_changes(baseline, current)
    old_ranks, new_ranks = derived_ranks(baseline), derived_ranks(current)
    changes += _stale_rank_notes(baseline, old_ranks, "baseline") + _stale_rank_notes(current, new_ranks, "new table")

    for task in sorted(set(baseline["tasks"]) & set(current["tasks"])):
        old, new = baseline["tasks"][task], current["tasks"][task]
        if old["metric"] != new["metric"] or old["higher_is_better"] != new["higher_is_better"]:
            continue  # not comparable: _structure_changes said why
        for name in sorted(set(old["backbones"]) & set(new["backbones"])):
            a, b = old["backbones"][name], new["backbones"][name]
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
