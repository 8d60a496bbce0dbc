"""The data config a running job can change (`mmdit ctl set`), and how a change is checked.

What can change, by key (the names of `conf/data`):

    task_weights.<task>          t2i, edit, reconstruction: relative weight of the task
    source_weights.<source>      a data source (shard stem)
    category_weights.<category>  nature, design, people, synthetic, text_rendering or unknown
    bucket_weights.<H>x<W>       a resolution bucket of the stage
    base_resolution              the curriculum stage: 256, 640 or 1328 (the cache must hold it)
    filters.<threshold>          every threshold of FilterConfig (min_blur, max_text_chars, ...)

Weights are finite and >= 0; a change that leaves every task at weight 0, or selects no sample
at all, is rejected, and so is any unknown key, wrong type or out-of-range value: the reply names
the reason and nothing changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mmdit.dataservice.plan import DataVersion
from mmdit.producer.categories import CategoryError, check_weights
from mmdit.producer.config import FilterConfig

WEIGHT_TABLES = ("task_weights", "source_weights", "category_weights", "bucket_weights")


class ChangeError(ValueError):
    """A data-config change that cannot be applied; the message says why, in one line."""


def version_zero(data_cfg, stage: int) -> DataVersion:
    """The job's starting data config as version 0 of its history."""
    return DataVersion(0, 0, 0, dict(data_cfg.task_weights), dict(data_cfg.source_weights),
                       dict(data_cfg.category_weights), dict(data_cfg.bucket_weights), stage,
                       dataclasses.asdict(data_cfg.filters), False, why="the job's config")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ChangeError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ChangeError(f"{key} must be finite, got {value}")
    return kind(value)


def apply_changes(version: DataVersion, changes: dict, stages: set[int]) -> tuple[DataVersion, dict]:
    """`version` with `changes` (key -> value) applied (number, start and bookkeeping unchanged),
    and the changes as applied (normalized). Raises ChangeError naming the first bad key."""
    if not isinstance(changes, dict) or not changes:
        raise ChangeError("no change given (expected KEY=VALUE pairs)")
    tables = {t: dict(getattr(version, t)) for t in WEIGHT_TABLES}
    filters = {**dataclasses.asdict(FilterConfig()), **version.filters}
    stage, applied = version.stage, {}
    for key, value in changes.items():
        if not isinstance(key, str):
            raise ChangeError(f"keys must be strings, got {key!r}")
        head, _, name = key.partition(".")
        if head == "category_weights" and name:
            try:
                (name,) = check_weights({name: None})
            except CategoryError as e:
                raise ChangeError(str(e)) from None
            tables[head][name] = applied[f"{head}.{name}"] = _weight(key, value)
        elif head in WEIGHT_TABLES and name:
            tables[head][name] = applied[key] = _weight(key, value)
        elif head == "filters" and name:
            filters[name] = applied[key] = _threshold(key, name, value)
        elif key == "base_resolution":
            if isinstance(value, bool) or not isinstance(value, int) or value not in stages:
                raise ChangeError(f"base_resolution must be one of the cached stages {sorted(stages)}, got {value!r}")
            stage = applied[key] = value
        else:
            raise ChangeError(f"unknown key {key!r}: changeable are {', '.join(WEIGHT_TABLES)} (as <table>.<name>), "
                              "filters.<threshold> and base_resolution")
    try:
        FilterConfig(**filters)  # the thresholds' own checks (min <= max, ...)
    except (TypeError, ValueError) as e:
        raise ChangeError(str(e)) from None
    new = dataclasses.replace(version, stage=stage, filters=filters, **tables)
    return new, applied
