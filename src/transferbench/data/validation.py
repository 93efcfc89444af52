"""great-expectations suites on a task's raw manifest and on its splits.

Suites (each expectation is critical unless marked warning):

- ``raw``: required columns; filename and group never null; label null only where the source
  has none (warning: e.g. COVID-19 ``todo``); filename unique (warning: upstream duplicates).
- ``train``/``val``/``test``: required columns; filename/label/group strings and not null; labels
  in the task's vocabulary; every image exists, decodes and is at least ``data.min_image_side``;
  the split's regions obey the geographic rule; a tiny split (< ``data.min_split_rows``) warns;
  ``train`` holds every class (classification only). A dense task (segmentation, depth) also has
  ``mask`` and ``depth`` on every row, each file readable and as large as its image: the mask 8-bit
  single-channel with no class above ``dense.num_classes``, the depth 16-bit with at least one
  reading (> 0) and none beyond ``dense.max_depth`` (DenseSettings has the format).
- ``all_splits``: no group and no image in two splits; every row is in the split the geographic
  rule (with its first-image resolution) gives it.

A critical failure raises ``DataError`` naming the expectation and the offending rows (so
``dvc repro`` stops); warnings are reported only. Both go to ``reports/validation/<task>.json``
and a readable ``<task>.md``, written atomically either way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from transferbench.config import DENSE_KINDS, DataSettings, DenseSettings, TaskSettings
from transferbench import atomic
from transferbench.data.geography import add_regions, geographic_assignment
from transferbench.data.images import probe_image
from transferbench.data.registry import REQUIRED_COLUMNS, dataset_root, get_dataset
from transferbench.data.splits import SUMMARY_FILE
from transferbench.data.tables import read_csv_strict
from transferbench.errors import DataError
from transferbench.data.layout import manifest_path, split_dir
from transferbench.paths import SPLITS

log = logging.getLogger(__name__)
MANIFEST_COLUMNS = ("filename", "label", "group")
MAX_LISTED = 200  # offending rows kept per expectation in the JSON report


@dataclass
class CheckResult:
    suite: str
    expectation: str
    kwargs: dict[str, Any]
    severity: str
    success: bool
    observed: Any = None
    offending: list[Any] = field(default_factory=list)
    offending_count: int = 0

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k not in ("batch_id", "value_set")
                         or k == "value_set" and len(str(v)) < 80)
        text = f"[{self.suite}] {self.expectation}({args})"
        if self.offending:
            shown = "; ".join(json.dumps(o, default=str) for o in self.offending[:10])
            more = f" (+{self.offending_count - 10} more)" if self.offending_count > 10 else ""
            text += f": {self.offending_count} offending: {shown}{more}"
        elif self.observed is not None:
            text += f": observed {self.observed!r}"
        return text


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return gx, context


class _Runner:
    """One ephemeral great-expectations context; runs suites on pandas frames."""

    def __init__(self) -> None:
        self.gx, context = _gx()
        asset = context.data_sources.add_pandas("transferbench").add_dataframe_asset("manifest")
        self.batch_definition = asset.add_batch_definition_whole_dataframe("whole")
        self.results: list[CheckResult] = []

    def run(self, suite_name: str, frame: pd.DataFrame, expectations: list, index_columns: list[str]) -> None:
        suite = self.gx.ExpectationSuite(name=suite_name)
        for expectation in expectations:
            suite.add_expectation(expectation)
        batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame.reset_index(drop=True)})
        outcome = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                       "unexpected_index_column_names": index_columns})
        for item in outcome.results:
            config = item.expectation_config
            result = item.result or {}
            offending = (result.get("unexpected_index_list") or result.get("partial_missing_list")
                         or result.get("details", {}).get("mismatched") or [])
            if item.exception_info and item.exception_info.get("raised_exception"):
                offending = [item.exception_info.get("exception_message")]
            count = result.get("unexpected_count", result.get("missing_count", len(offending)))
            self.results.append(CheckResult(
                suite=suite_name, expectation=config.type,
                kwargs={k: v for k, v in config.kwargs.items() if k != "batch_id"},
                severity="warning" if str(config.severity).lower().endswith("warning") else "error",
                success=bool(item.success), observed=result.get("observed_value"),
                offending=list(offending)[:MAX_LISTED], offending_count=int(count or 0)))


def _read_manifest(path: Path) -> pd.DataFrame:
    frame = read_csv_strict(path, required=MANIFEST_COLUMNS, what="split manifest")
    for column in MANIFEST_COLUMNS:
        frame[column] = frame[column].where(frame[column] != "", None)
    return frame


def _image_checks(frame: pd.DataFrame, min_side: int) -> pd.Series:
    """Per row: "ok", or why its image is unusable or no longer the one the split stage saw (md5)."""
    checks = []
    recorded = frame["md5"] if "md5" in frame else pd.Series(None, index=frame.index, dtype="object")
    for filename, md5 in zip(frame["filename"], recorded, strict=True):
        if not isinstance(filename, str):
            checks.append("no filename")
            continue
        probe = probe_image(filename, min_side=min_side)
        if probe.reason is not None:
            checks.append(f"{probe.reason}: {probe.detail}")
        elif isinstance(md5, str) and md5 != probe.md5:
            checks.append(f"changed_since_split: {filename} has md5 {probe.md5}, the manifest {md5} "
                          "(rerun the split stage: dvc repro)")
        else:
            checks.append("ok")
    return pd.Series(checks, index=frame.index, dtype="object")


def _size(path: object) -> tuple[int, int] | None:
    """An image's (width, height), None when it does not open (image_check reports why)."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception:  # PIL raises many types for undecodable data
        return None


def _dense_check(path: object, image_size: tuple[int, int] | None, what: str, modes: tuple[str, ...],
                 judge: Callable[[str, np.ndarray], str]) -> str:
    """Why the ``what`` file at ``path`` is unusable, else ``judge(path, pixels)`` ("ok" or why not)."""
    if not isinstance(path, str):
        return f"no {what} file named"
    if not Path(path).is_file():
        return f"missing: no {what} file at {path}"
    try:
        with Image.open(path) as image:
            image.load()
            mode, size, values = image.mode, image.size, np.asarray(image)
    except Exception as exc:  # PIL raises many types for undecodable data
        return f"corrupt: {path} does not decode: {type(exc).__name__}: {exc}"
    if mode not in modes:
        return f"wrong format: {path} is PIL mode {mode}, expected {' or '.join(modes)}"
    if image_size is not None and size != image_size:
        return f"size differs: {path} is {size[0]}x{size[1]} px, its image {image_size[0]}x{image_size[1]}"
    return judge(path, values)


def _dense_checks(frame: pd.DataFrame, dense: DenseSettings) -> tuple[pd.Series, pd.Series]:
    """Per row: "ok", or why its mask (8-bit, classes 0..num_classes) or depth (16-bit mm) is unusable."""

    def mask_values(path: str, values: np.ndarray) -> str:
        top = int(values.max(initial=0))
        if top > dense.num_classes:
            return f"class above num_classes: {path} holds {top} > dense.num_classes={dense.num_classes}"
        return "ok"

    def depth_values(path: str, values: np.ndarray) -> str:
        valid = values[values > 0]
        if not valid.size:
            return f"no valid pixel: {path} is 0 (no reading) everywhere"
        if valid.max() > dense.max_depth * 1000:
            return f"depth above max_depth: {path} holds {valid.max() / 1000:g} m > dense.max_depth={dense.max_depth} m"
        return "ok"

    masks, depths = [], []
    for filename, mask, depth in zip(frame["filename"], frame.get("mask", [None] * len(frame)),
                                     frame.get("depth", [None] * len(frame)), strict=True):
        size = _size(filename) if isinstance(filename, str) else None
        masks.append(_dense_check(mask, size, "mask", ("L",), mask_values))
        depths.append(_dense_check(depth, size, "depth", ("I;16", "I;16B"), depth_values))
    return pd.Series(masks, index=frame.index, dtype="object"), pd.Series(depths, index=frame.index, dtype="object")


def validate_task(name: str, task: TaskSettings, data: DataSettings) -> dict:
    """Run every suite for task ``name``; write the reports; raise ``DataError`` on a critical failure."""
    E = None  # noqa: N806 - set once great-expectations is imported
    runner = _Runner()
    E = runner.gx.expectations  # noqa: N806
    summary_path = split_dir(data, name) / SUMMARY_FILE
    if not summary_path.is_file():
        raise DataError(f"{summary_path} not found; run `transferbench split {name}` first")
    classes = json.loads(summary_path.read_text())["classes"]
    vocabulary = list(task.options.classes) or classes
    dense = task.kind in DENSE_KINDS
    dense_columns = ("mask", "depth") if dense else ()
    geographic = task.split.rule == "geographic"
    rule = task.split.geographic

    # raw manifest
    raw = get_dataset(task.dataset).manifest(dataset_root(data, task.dataset))
    runner.run("raw", raw.astype({"source_row": "int64"}), [
        *(E.ExpectColumnToExist(column=c) for c in REQUIRED_COLUMNS),
        E.ExpectColumnValuesToNotBeNull(column="filename"),
        E.ExpectColumnValuesToNotBeNull(column="group"),
        E.ExpectColumnValuesToNotBeNull(column="label", severity="warning"),
        E.ExpectColumnValuesToBeUnique(column="filename", severity="warning"),
        *(E.ExpectColumnToExist(column=c) for c in dense_columns),
    ], ["source_row"])

    # each split
    frames = []
    for split in SPLITS:
        frame = _read_manifest(manifest_path(data, name, split))
        frame["image_check"] = _image_checks(frame, data.min_image_side)
        for column in dense_columns:
            if column in frame:
                frame[column] = frame[column].where(frame[column] != "", None)
        if dense:  # each row's mask and depth files, read like its image
            frame["mask_check"], frame["depth_check"] = _dense_checks(frame, task.dense)
        if task.kind == "age" and "age" in frame:  # a non-integer age becomes null and fails the not-null check
            ages = pd.to_numeric(frame["age"], errors="coerce")
            frame["age"] = ages.where(ages == ages.round())
        expectations = [
            *(E.ExpectColumnToExist(column=c) for c in MANIFEST_COLUMNS),
            *(E.ExpectColumnValuesToNotBeNull(column=c) for c in MANIFEST_COLUMNS),
            *(E.ExpectColumnValuesToBeOfType(column=c, type_="str") for c in MANIFEST_COLUMNS),
            E.ExpectColumnValuesToBeInSet(column="label", value_set=vocabulary),
            E.ExpectColumnValuesToBeInSet(column="image_check", value_set=["ok"]),
            E.ExpectTableRowCountToBeBetween(min_value=max(1, data.min_split_rows), severity="warning"),
            E.ExpectTableRowCountToBeBetween(min_value=1),
        ]
        if split == "train" and task.kind == "classification":  # every class seen in training
            expectations.append(E.ExpectColumnDistinctValuesToContainSet(column="label", value_set=vocabulary))
        if dense:
            expectations += [*(E.ExpectColumnToExist(column=c) for c in dense_columns),
                             *(E.ExpectColumnValuesToNotBeNull(column=c) for c in dense_columns),
                             E.ExpectColumnValuesToBeInSet(column="mask_check", value_set=["ok"]),
                             E.ExpectColumnValuesToBeInSet(column="depth_check", value_set=["ok"])]
        if task.kind == "age":  # the target: an integer age the softmax covers (0..age.max_age)
            expectations += [E.ExpectColumnToExist(column="age"), E.ExpectColumnValuesToNotBeNull(column="age"),
                             E.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=task.age.max_age)]
        if geographic and split in ("train", "val") and "region" in frame:
            allowed = rule.train_regions if split == "train" else rule.val_regions
            expectations.append(E.ExpectColumnValuesToBeInSet(column="region", value_set=list(allowed)))
        if geographic and split == "test" and "region" in frame:
            expectations.append(E.ExpectColumnValuesToNotBeInSet(column="region", value_set=list(rule.val_regions)))
        runner.run(split, frame, expectations, ["filename"])
        frames.append(frame.assign(split=split))

    # across splits
    combined = pd.concat(frames, ignore_index=True)
    pairs = combined[["group", "split"]].drop_duplicates()
    runner.run("all_splits_groups", pairs, [E.ExpectColumnValuesToBeUnique(column="group")], ["group", "split"])
    cross = [E.ExpectColumnValuesToBeUnique(column="filename")]
    if geographic:
        if "location" not in combined:
            raise DataError(f"task {name!r}: geographic split manifests lack the 'location' column")
        regional = add_regions(combined.drop(columns=["country", "region"], errors="ignore"), data)
        combined["expected_split"] = geographic_assignment(regional, rule)[0].fillna("excluded")
        combined["region"] = regional["region"]
        cross.append(E.ExpectColumnPairValuesToBeEqual(column_A="split", column_B="expected_split"))
    runner.run("all_splits", combined, cross, ["filename", "group"])

    return _report(name, runner.results, data)


def _report(name: str, results: list[CheckResult], data: DataSettings) -> dict:
    errors = [r for r in results if not r.success and r.severity == "error"]
    warnings = [r for r in results if not r.success and r.severity == "warning"]
    report = {"task": name, "success": not errors, "checked": len(results),
              "errors": [r.describe() for r in errors], "warnings": [r.describe() for r in warnings],
              "results": [asdict(r) for r in results]}
    out = Path(data.reports_dir) / "validation"
    atomic.write_json(out / f"{name}.json", report)
    atomic.write_text(out / f"{name}.md", _markdown(name, results, report))
    for warning in warnings:
        log.warning("validation warning: %s", warning.describe())
    if errors:
        raise DataError(f"validation of task {name!r} failed ({len(errors)} critical expectation(s); "
                        f"report: {out / (name + '.md')}):\n  " + "\n  ".join(r.describe() for r in errors))
    return report


def _markdown(name: str, results: list[CheckResult], report: dict) -> str:
    status = "PASSED" if report["success"] else "FAILED"
    lines = [f"# Validation of task `{name}`: {status}", "",
             f"{report['checked']} expectations, {len(report['errors'])} critical failures, "
             f"{len(report['warnings'])} warnings (great-expectations).", "",
             "| suite | expectation | severity | result | offending / observed |", "|---|---|---|---|---|"]
    for r in results:
        detail = (f"{r.offending_count}: " + "; ".join(json.dumps(o, default=str) for o in r.offending[:5])
                  if r.offending else ("" if r.observed is None else f"observed {r.observed}"))
        args = ", ".join(f"{k}={v}" for k, v in r.kwargs.items() if k in ("column", "column_A", "column_B",
                                                                          "min_value", "value_set"))
        lines.append(f"| {r.suite} | `{r.expectation}` ({args}) | {r.severity} | "
                     f"{'ok' if r.success else 'FAIL'} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
