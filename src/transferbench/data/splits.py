"""Task splits: filter a dataset's manifest, quarantine bad rows, apply the task's split rule
and write ``train/val/test.csv`` + ``summary.json`` + ``quarantine.csv`` (PROTOCOL.md, "Tasks and
splits").

Split rules live in a registry (``@split_rule``):

- ``geographic`` (COVID-19): regions -> splits, patients resolved by their first image
  (transferbench.data.geography);
- ``random`` (Flower102, Caltech101, WikiArt, NYU): groups shuffled per class, cut by fractions;
- ``official`` (CUB200, Indoor67): the official test list; ``val_fraction`` of official train -> val;
- ``by_group`` (FG-NET): ``test_groups`` individuals to test, ``val_groups`` to val, rest train.

Every rule assigns whole groups, so no group appears in two splits, and is deterministic for
a seed. Every row that does not reach a split is listed in ``quarantine.csv`` with its reason;
bad input (a missing/empty/corrupt/too-small image, a duplicate file, an unknown label or
region) is also reported row by row on stderr. The task directory is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from transferbench.config import DataSettings, SplitSettings, TaskSettings
from transferbench import atomic
from transferbench.data.geography import add_regions, geographic_assignment
from transferbench.data.images import probe_image
from transferbench.data.registry import check_manifest_columns, dataset_root, get_dataset
from transferbench.errors import DataError
from transferbench.data.layout import split_dir
from transferbench.paths import SPLITS

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.csv"
SUMMARY_FILE = "summary.json"
# Reasons that mean the input is bad (reported row by row), not merely filtered out by design.
BAD_INPUT = {"duplicate_image", "unknown_label", "unknown_region", "missing_image", "empty_file",
             "decompression_bomb", "corrupt_image", "too_small", "bad_official_split"}
LEADING_COLUMNS = ("filename", "label", "group", "region", "country", "location")
DROPPED_COLUMNS = ("exclude", "exclude_detail")

SplitRule = Callable[[pd.DataFrame, SplitSettings], tuple[pd.Series, list[dict]]]
SPLIT_RULES: dict[str, SplitRule] = {}


def split_rule(name: str) -> Callable[[SplitRule], SplitRule]:
    def register(rule: SplitRule) -> SplitRule:
        SPLIT_RULES[name] = rule
        return rule

    return register


# --------------------------------------------------------------------------- rules
def _group_labels(frame: pd.DataFrame) -> pd.Series:
    """Each group's label (its first row's), for stratifying group-level splits; sorted by group."""
    return frame.sort_values("source_row", kind="stable").groupby("group")["label"].first().sort_index()


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


@split_rule("geographic")
def geographic_split(frame: pd.DataFrame, split: SplitSettings) -> tuple[pd.Series, list[dict]]:
    return geographic_assignment(frame, split.geographic)


@split_rule("random")
def random_split(frame: pd.DataFrame, split: SplitSettings) -> tuple[pd.Series, list[dict]]:
    rng = np.random.default_rng(split.seed)
    _, f_val, f_test = split.fractions
    assignment: dict[str, str] = {}
    labels = _group_labels(frame)
    for label in sorted(labels.unique()):
        groups = _shuffled(sorted(labels.index[labels == label]), rng)
        n_val, n_test = round(f_val * len(groups)), round(f_test * len(groups))
        for i, group in enumerate(groups):
            assignment[group] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return frame["group"].map(assignment), []


@split_rule("official")
def official_split(frame: pd.DataFrame, split: SplitSettings) -> tuple[pd.Series, list[dict]]:
    if "official_split" not in frame:
        raise DataError("split rule 'official' needs an 'official_split' column; this dataset has none")
    rng = np.random.default_rng(split.seed)
    official = frame.groupby("group")["official_split"].first()
    assignment = {g: "test" for g in official.index[official == "test"]}
    train = frame[frame["group"].isin(official.index[official == "train"])]
    labels = _group_labels(train)
    for label in sorted(labels.unique()):
        groups = _shuffled(sorted(labels.index[labels == label]), rng)
        n_val = round(split.val_fraction * len(groups))
        for i, group in enumerate(groups):
            assignment[group] = "val" if i < n_val else "train"
    return frame["group"].map(assignment), []


@split_rule("by_group")
def by_group_split(frame: pd.DataFrame, split: SplitSettings) -> tuple[pd.Series, list[dict]]:
    groups = sorted(frame["group"].unique())
    needed = split.test_groups + split.val_groups + 1
    if len(groups) < needed:
        raise DataError(f"split rule 'by_group' needs at least {needed} groups "
                        f"(test_groups + val_groups + 1 for train), the data has {len(groups)}")
    order = _shuffled(groups, np.random.default_rng(split.seed))
    assignment = {g: "test" for g in order[:split.test_groups]}
    assignment.update({g: "val" for g in order[split.test_groups:split.test_groups + split.val_groups]})
    return frame["group"].map(lambda g: assignment.get(g, "train")), []


# --------------------------------------------------------------------------- filtering
class _Exclusions:
    """First reason wins: each row is excluded for the first check it fails."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.reason = pd.Series(pd.NA, index=frame.index, dtype="object")
        self.detail = pd.Series("", index=frame.index, dtype="object")

    def add(self, mask: pd.Series, reason: pd.Series | str, detail: pd.Series | str) -> None:
        mask = mask.fillna(False).astype(bool) & self.reason.isna()
        self.reason[mask] = reason[mask] if isinstance(reason, pd.Series) else reason
        self.detail[mask] = detail[mask] if isinstance(detail, pd.Series) else detail

    @property
    def open(self) -> pd.Series:
        return self.reason.isna()


def _keep_only(frame: pd.DataFrame, exclusions: _Exclusions, column: str, allowed: tuple[str, ...]) -> None:
    if not allowed:
        return
    if column not in frame:
        raise DataError(f"task option '{column}s' is set but the dataset has no '{column}' column")
    exclusions.add(~frame[column].isin(allowed), column, frame[column].astype(str))


def prepare(frame: pd.DataFrame, task: TaskSettings, data: DataSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows kept with final labels, regions and image sizes; rows excluded with reason and detail)."""
    options = task.options
    frame = frame.reset_index(drop=True)
    ex = _Exclusions(frame)
    _keep_only(frame, ex, "modality", options.modalities)
    _keep_only(frame, ex, "view", options.views)
    if "exclude" in frame:
        ex.add(frame["exclude"].notna() & (frame["exclude"] != ""), frame["exclude"], frame["exclude_detail"])
    ex.add(frame["label"].isna() | (frame["label"] == ""), "no_label", "empty label")

    first_row = frame.groupby("filename")["source_row"].transform("first").astype(str)
    ex.add(frame["filename"].duplicated(), "duplicate_image", "same file as source row " + first_row)

    label = frame["label"].astype("object")
    if options.positive_finding is not None:
        positive = label.str.contains(options.positive_finding, regex=False, na=False)
        label = label.where(label.isna(), options.negative_label).where(~positive, options.positive_finding)
    frame["label"] = label
    if options.classes:
        ex.add(~frame["label"].isin(options.classes) & frame["label"].notna(), "unknown_label",
               "label " + frame["label"].map(repr) + f" not in classes {list(options.classes)}")

    if "location" in frame:
        frame = add_regions(frame, data)
        if task.split.rule == "geographic" and task.split.geographic.unknown_location == "exclude":
            ex.add(frame["country"].isna(), "no_location", "location " + frame["location"].map(repr))
            ex.add(frame["region"].isna(), "unknown_region",
                   "country " + frame["country"].map(repr) + " is not listed under data.regions")
    elif task.split.rule == "geographic":
        raise DataError(f"split rule 'geographic' needs a 'location' column; dataset {task.dataset!r} has none")

    if task.split.rule == "official":
        ex.add(~frame.get("official_split", pd.Series("", index=frame.index)).isin(["train", "test"]),
               "bad_official_split", "official_split is not train/test")

    probes = {i: probe_image(frame.at[i, "filename"], min_side=data.min_image_side) for i in frame.index[ex.open]}
    for i, probe in probes.items():
        if probe.reason is not None:
            ex.add(pd.Series(frame.index == i, index=frame.index), probe.reason, probe.detail)
    frame["width"] = pd.Series({i: p.width for i, p in probes.items()}, dtype="Int64")
    frame["height"] = pd.Series({i: p.height for i, p in probes.items()}, dtype="Int64")
    frame["md5"] = pd.Series({i: p.md5 for i, p in probes.items()}, dtype="object")

    excluded = frame[~ex.open].assign(reason=ex.reason[~ex.open], detail=ex.detail[~ex.open])
    return frame[ex.open].copy(), excluded


# --------------------------------------------------------------------------- summary and writing
def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    lead = [c for c in LEADING_COLUMNS if c in frame]
    rest = [c for c in frame.columns if c not in lead and c not in DROPPED_COLUMNS and c != "split"]
    return frame[lead + rest]


def summarise(name: str, task: TaskSettings, kept: pd.DataFrame, excluded: pd.DataFrame,
              conflicts: list[dict], classes: list[str], source_rows: int) -> dict:
    region = kept["region"].fillna("unknown") if "region" in kept else pd.Series("all", index=kept.index)
    counts: dict = {}
    for split in SPLITS:
        rows = kept[kept["split"] == split]
        counts[split] = {label: {r: int(n) for r, n in sorted(region[rows.index][rows["label"] == label]
                                                             .value_counts().items())}
                         for label in classes}
    detail = excluded["detail"].str.extract(r"^(?:finding |label |location |country )?(.*)$")[0]
    by_detail: dict = {}
    for reason, value in zip(excluded["reason"], detail):
        by_detail.setdefault(reason, {}).setdefault(value.strip("'\""), 0)
        by_detail[reason][value.strip("'\"")] += 1
    return {
        "task": name,
        "dataset": task.dataset,
        "rule": task.split.rule,
        "seed": task.split.seed,
        "classes": classes,
        "source_rows": source_rows,
        "rows": {s: int((kept["split"] == s).sum()) for s in SPLITS},
        "groups": {s: int(kept.loc[kept["split"] == s, "group"].nunique()) for s in SPLITS},
        "counts": counts,
        "excluded_total": int(len(excluded)),
        "excluded": {k: int(v) for k, v in excluded["reason"].value_counts().sort_index().items()},
        "excluded_detail": {k: dict(sorted(v.items())) for k, v in sorted(by_detail.items())
                            if k in ("modality", "view", "no_label", "unknown_region", "unknown_label")},
        "group_conflicts": conflicts,
        "quarantine_file": QUARANTINE_FILE,
        # what the task was split and is trained as: a multitask task reads its components' settings here, so that
        # its stage depends on their split outputs rather than on every task's params
        "settings": task.model_dump(mode="json"),
    }


def split_task(name: str, task: TaskSettings, data: DataSettings) -> dict:
    """Split task ``name`` and write its directory under ``data.splits_dir``; return the summary."""
    adapter = get_dataset(task.dataset)
    root = dataset_root(data, task.dataset)
    if not root.is_dir():
        how = "transferbench generate" if adapter.generated else "transferbench fetch"
        raise DataError(f"dataset {task.dataset!r} not found at {root}; run `{how} {task.dataset}` first")
    frame = adapter.manifest(root)
    check_manifest_columns(frame, str(root))
    kept, excluded = prepare(frame, task, data)
    for _, row in excluded[excluded["reason"].isin(BAD_INPUT)].iterrows():
        log.warning("%s source row %s quarantined (%s): %s", root, row["source_row"], row["reason"], row["detail"])
    if kept.empty:
        raise DataError(f"task {name!r}: no usable rows left in {root} ({len(excluded)} excluded; "
                        f"reasons {excluded['reason'].value_counts().to_dict()})")
    assignment, conflicts = SPLIT_RULES[task.split.rule](kept, task.split)
    kept["split"] = assignment
    for conflict in conflicts:
        log.warning("task %s: group %s has images in %s by region; its first image %s decides: %s",
                    name, conflict["group"], conflict["splits_by_region"], conflict["decided_by"], conflict["split"])
    classes = sorted(task.options.classes) if task.options.classes else sorted(kept["label"].unique())
    summary = summarise(name, task, kept, excluded, conflicts, classes, len(frame))
    with atomic.atomic_directory(split_dir(data, name)) as tmp:
        for split in SPLITS:
            atomic.write_csv(tmp / f"{split}.csv", _ordered(kept[kept["split"] == split]))
        quarantine = _ordered(excluded)
        quarantine = quarantine[["reason", "detail", "source_row"] +
                                [c for c in quarantine.columns if c not in ("reason", "detail", "source_row")]]
        atomic.write_csv(tmp / QUARANTINE_FILE, quarantine)
        atomic.write_json(tmp / SUMMARY_FILE, summary)
    return summary


def manifest_files(data: DataSettings, name: str) -> dict[str, Path]:
    return {split: split_dir(data, name) / f"{split}.csv" for split in SPLITS}
