"""Locations -> countries -> regions, and the geographic split rule (PROTOCOL.md, COVID-19:
train = Australia and America, val = Africa, test = every other known location).

The country is the last comma-separated part of the free-text ``location``; the region comes
from the ``data.regions`` table in params.yaml. The rule assigns regions to splits, then
resolves patients whose images would land in two splits: **the patient's first image decides**
(lowest ``offset``, ties and missing offsets broken by the source row), so a group never
crosses splits. Split and validation both call ``geographic_assignment``, so they agree.
"""

from __future__ import annotations

import pandas as pd

from transferbench.config import DataSettings, GeographicRule

UNKNOWN_LOCATIONS = {"", "?", "unknown", "n/a", "na"}


def country_of(location: object) -> str | None:
    """'Cho Ray Hospital, Ho Chi Minh City, Vietnam' -> 'Vietnam'; None for empty or '?'."""
    if not isinstance(location, str) or location.strip().casefold() in UNKNOWN_LOCATIONS:
        return None
    country = location.split(",")[-1].strip().rstrip(".")
    return None if country.casefold() in UNKNOWN_LOCATIONS else country


def add_regions(frame: pd.DataFrame, data: DataSettings) -> pd.DataFrame:
    """Add ``country`` and ``region`` (NA when unknown) from the ``location`` column."""
    countries = frame["location"].map(country_of)
    frame = frame.copy()
    frame["country"] = countries.astype("object").where(countries.notna(), pd.NA)
    frame["region"] = [data.region_of(c) if isinstance(c, str) else pd.NA for c in countries]
    frame["region"] = frame["region"].astype("object").where(frame["region"].notna(), pd.NA)
    return frame


def region_split(region: object, country: object, rule: GeographicRule) -> str | None:
    """The split one image's region sends it to; None when its region is unknown and excluded."""
    if not isinstance(region, str):
        return "test" if rule.unknown_location == "test" else None
    if region in rule.train_regions:
        if rule.america == "usa" and region == "Americas" and str(country).casefold() != "usa":
            return "test"
        return "train"
    if region in rule.val_regions:
        return "val"
    return "test"


def first_image_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted so that each group's first image comes first (offset, then source row)."""
    offset = pd.to_numeric(frame["offset"], errors="coerce") if "offset" in frame else pd.Series(0, frame.index)
    source_row = pd.to_numeric(frame["source_row"], errors="coerce")
    key = pd.DataFrame({"offset": offset, "source_row": source_row}, index=frame.index)
    return frame.loc[key.sort_values(["offset", "source_row"], na_position="last", kind="stable").index]


def geographic_assignment(frame: pd.DataFrame, rule: GeographicRule) -> tuple[pd.Series, list[dict]]:
    """Each row's split (None: excluded) and the groups the first-image rule had to resolve."""
    by_row = pd.Series([region_split(r, c, rule) for r, c in zip(frame["region"], frame["country"])],
                       index=frame.index, dtype="object")
    ordered = first_image_order(frame.assign(_split=by_row))
    decided = ordered.dropna(subset=["_split"]).groupby("group", sort=False).first()
    split = frame["group"].map(decided["_split"]).where(by_row.notna(), None)
    conflicts = []
    for group, rows in frame.assign(_split=by_row).dropna(subset=["_split"]).groupby("group"):
        if rows["_split"].nunique() > 1:
            conflicts.append({"group": group, "splits_by_region": sorted(rows["_split"].unique()),
                              "decided_by": decided.loc[group, "filename"], "split": decided.loc[group, "_split"]})
    return split, conflicts
