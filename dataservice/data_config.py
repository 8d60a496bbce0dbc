"""The data config a running job can change (`mmdit ctl set`), and how a change is checked.

What can change, by key (the names of `conf/data`):

    task_weights.<task>          t2i, edit, reconstruction: relative weight of the task
    source_weights.<source>      a data source (shard stem)
    category_weights.<category>  nature, design, people, synthetic, text_rendering or unknown
    bucket_weights.<H>x<W>       a resolution bucket the job's samples have
    stage_weights.<base>         multi-scale: draw every named stage (e.g. 640 and 1328), weighed;
                                 an empty table draws base_resolution's stage only
    caption_sources.<source>     original, annotation: which caption text-to-image samples train
                                 with (unnamed: original 1, annotation 0)
    base_resolution              the curriculum stage: 256, 640 or 1328 (the cache must hold it)
    <table> / filters            a mapping replaces the whole table / every threshold (a preset)
    filters.<threshold>          every threshold of FilterConfig (min_blur, max_text_chars, ...)
    filters.curated_list         a key-list file (SFT's curated set), or '' for none

Weights are finite and >= 0; a change that leaves every task at weight 0, or selects no sample
at all, or weighs every caption source 0, is rejected, and so is any unknown key, wrong type or
out-of-range value, a bucket or stage the job has no sample of, and an empty task table (the other
tables are empty by default: every name weighs 1): the reply names the reason and nothing changes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from mmdit.config.data import CAPTION_SOURCES, CategoryError, FilterConfig, Mixture, check_category_weights
from mmdit.dataservice.plan import DataVersion

WEIGHT_TABLES = Mixture.TABLES


class ChangeError(ValueError):
    """A data-config change that cannot be applied; the message says why, in one line."""


def version_zero(data_cfg, stage: int) -> DataVersion:
    """The job's starting data config as version 0 of its history."""
    return DataVersion(0, 0, 0, **data_cfg.tables(), stage=stage, filters=dataclasses.asdict(data_cfg.filters),
                       why="the job's config")


def describe(version: DataVersion) -> dict:
    """The data config in force, as `mmdit ctl get` shows it (conf/data names)."""
    return {"config_version": version.version, "base_resolution": version.stage or None,
            **{t: dict(getattr(version, t)) for t in WEIGHT_TABLES},
            "filters": {**dataclasses.asdict(FilterConfig()), **version.filters},
            "encode_missing": version.encode_missing}


def _weight(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ChangeError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ChangeError(f"{key} must be finite and >= 0, got {value}")
    return float(value)


def _threshold(key: str, name: str, value: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(FilterConfig)}
    if name not in fields:
        raise ChangeError(f"unknown key {key!r} (filters are {', '.join(fields)})")
    kind = type(getattr(FilterConfig(), name))
    if kind is bool:
        if not isinstance(value, bool):
            raise ChangeError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is str:  # filters.curated_list: a key-list file on the coordinator's host, or "" for none
        if not isinstance(value, str) or (value and not os.path.isfile(value)):
            raise ChangeError(f"{key} must be a path to an existing file or '', got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ChangeError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ChangeError(f"{key} must be finite, got {value}")
    return kind(value)


def _table_entry(table: str, name: str, value: Any, stages: set[int], buckets: set[str] | None) -> tuple[str, float]:
    """One weight: (canonical name, weight); ChangeError naming it when either is bad."""
    key = f"{table}.{name}"
    if table == "category_weights":
        try:
            (name,) = check_category_weights({name: None})
        except CategoryError as e:
            raise ChangeError(str(e)) from None
    elif table == "stage_weights":
        if not (str(name).isdigit() and int(name) in stages):
            raise ChangeError(f"{key}: {name!r} is not a cached stage (cached: {sorted(stages)})")
        name = str(int(name))
    elif table == "caption_sources" and name not in CAPTION_SOURCES:
        raise ChangeError(f"{key}: unknown caption source (one of {', '.join(CAPTION_SOURCES)})")
    elif table == "bucket_weights" and buckets is not None and name not in buckets:
        raise ChangeError(f"{key}: the job has no sample in bucket {name!r} (buckets: {_listed(buckets)})")
    return str(name), _weight(key, value)


def _listed(names: set[str], at_most: int = 12) -> str:
    shown = sorted(names)[:at_most]
    return ", ".join(shown) + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def apply_changes(version: DataVersion, changes: dict, stages: set[int],
                  buckets: set[str] | None = None) -> tuple[DataVersion, dict]:
    """`version` with `changes` (key -> value) applied (number, start and bookkeeping unchanged),
    and the changes as applied (normalized). Raises ChangeError naming the first bad key.
    `buckets` ("HxW") are those the job has samples of (None: bucket names are not checked).

    `<table>.<name>` sets one weight; `<table>` with a mapping replaces the whole table, and
    `filters` with a mapping every threshold (those not named return to their defaults): how a
    data preset (conf/data/stageN.yaml) is applied as a whole.
    """
    if not isinstance(changes, dict) or not changes:
        raise ChangeError("no change given (expected KEY=VALUE pairs)")
    tables = {t: dict(getattr(version, t)) for t in WEIGHT_TABLES}
    filters = {**dataclasses.asdict(FilterConfig()), **version.filters}
    stage, applied = version.stage, {}
    for key, value in changes.items():
        if not isinstance(key, str):
            raise ChangeError(f"keys must be strings, got {key!r}")
        head, _, name = key.partition(".")
        if head in WEIGHT_TABLES and name:
            name, weight = _table_entry(head, name, value, stages, buckets)
            tables[head][name] = applied[f"{head}.{name}"] = weight
        elif head in WEIGHT_TABLES:
            if not isinstance(value, dict):
                raise ChangeError(f"{key} (a whole table) must be a mapping of names to weights, got {value!r}")
            if head == "task_weights" and not value:
                raise ChangeError("task_weights: an empty table would weigh every task 1; name the tasks "
                                  "(e.g. task_weights={t2i: 1, edit: 0})")
            tables[head] = dict(_table_entry(head, str(n), w, stages, buckets) for n, w in value.items())
            applied[key] = dict(tables[head])
        elif head == "filters" and name:
            filters[name] = applied[key] = _threshold(key, name, value)
        elif key == "filters":
            if not isinstance(value, dict):
                raise ChangeError(f"filters (every threshold) must be a mapping, got {value!r}")
            filters = dataclasses.asdict(FilterConfig())
            for n, v in value.items():
                filters[n] = _threshold(f"filters.{n}", n, v)
            applied[key] = dict(filters)
        elif key == "base_resolution":
            if isinstance(value, bool) or not isinstance(value, int) or value not in stages:
                raise ChangeError(f"base_resolution must be one of the cached stages {sorted(stages)}, got {value!r}")
            stage = applied[key] = value
        else:
            raise ChangeError(f"unknown key {key!r}: changeable are {', '.join(WEIGHT_TABLES)} (as <table>.<name>, "
                              "or <table> with a mapping), filters.<threshold>, filters and base_resolution")
    try:
        FilterConfig(**filters)  # the thresholds' own checks (min <= max, ...)
    except (TypeError, ValueError) as e:
        raise ChangeError(str(e)) from None
    new = dataclasses.replace(version, stage=stage, filters=filters, **tables)
    if not any(new.caption_weights().values()):
        raise ChangeError("caption_sources: every caption weight would be 0")
    return new, applied
