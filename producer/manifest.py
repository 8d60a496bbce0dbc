"""The manifest: one Parquet row per sample seen (scores, decode status, bucket), and `select`.

Every producer writes its rows as its own part files, `<dir>/part-<time>-<writer>-<seq>.parquet`,
each published by atomic rename, so producers over different shards never contend and a killed
producer loses only its unflushed rows. `read_manifest` reads all parts back as one table,
keeping the newest row per key (a rerun re-describes a sample; its scores do not change).

`select` applies `FilterConfig` thresholds to the stored scores. The streaming producer applies
the very same rules row batch by row batch (`rejection_reasons`), so what it encodes is what a
later `select` over the whole manifest accepts, up to duplicates (a producer only knows the
duplicates in its own shards; `select` dedupes across all of them).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdit.producer.config import FilterConfig
from mmdit.utils.atomic import atomic_path

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("url", pa.string()),
    ("source", pa.string()),
    ("task", pa.string()),
    ("status", pa.string()),          # "ok" or the decode error reason
    ("detail", pa.string()),          # error detail / conversions applied
    ("caption_chars", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("aspect", pa.float32()),
    ("blur", pa.float32()),
    ("brightness", pa.float32()),
    ("saturation", pa.float32()),
    ("contrast", pa.float32()),
    ("entropy", pa.float32()),
    ("phash", pa.int64()),
    ("src_width", pa.int32()),
    ("src_height", pa.int32()),
    ("base_resolution", pa.int32()),
    ("bucket_h", pa.int32()),
    ("bucket_w", pa.int32()),
    ("src_bucket_h", pa.int32()),    # edit: the source image's bucket (cond_latents shape x 8)
    ("src_bucket_w", pa.int32()),
    ("text_chars", pa.int32()),      # characters of rendered text the sample shows (metadata), 0: none
])
OK = "ok"
REASONS = ("min_side", "aspect", "blur", "brightness", "contrast", "entropy", "caption_length", "text_length",
           "duplicate")
"""Filter rejection reasons, in the order they are checked (a row counts under its first)."""


# ----------------------------------------------------------------------------- selection


def _col(cols, name, dtype=np.float64) -> np.ndarray:
    """Column `name` as numpy; missing scores (rows that failed to decode, or a manifest written
    before the column existed) read as 0."""
    if name not in (cols.column_names if isinstance(cols, pa.Table) else cols):
        rows = cols.num_rows if isinstance(cols, pa.Table) else len(next(iter(cols.values())))
        return np.zeros(rows, dtype=dtype)
    v = cols[name]
    if isinstance(v, (pa.ChunkedArray, pa.Array)):
        v = (v if dtype is object else v.fill_null(0)).to_numpy(zero_copy_only=False)
    elif dtype is not object:
        v = [0 if x is None else x for x in v]
    return np.asarray(v, dtype=dtype)


def rejection_reasons(cols, filters: FilterConfig) -> np.ndarray:
    """Per row: '' if it passes the score thresholds, else the first failing reason.

    `cols` maps column name -> array (a pyarrow Table or a dict of lists/arrays) with at least
    status, width, height, blur, brightness, contrast, entropy, caption_chars; rows whose status
    is not ok get their status as the reason. Duplicates are handled by `duplicates`.
    """
    status = np.asarray(_col(cols, "status", object), dtype=object)
    out = np.where(status == OK, "", status).astype(object)
    ok = status == OK
    w, h = _col(cols, "width"), _col(cols, "height")
    aspect = w / np.maximum(h, 1)
    chars = _col(cols, "caption_chars")
    checks = (
        ("min_side", np.minimum(w, h) < filters.min_side),
        ("aspect", (aspect < filters.min_aspect) | (aspect > filters.max_aspect)),
        ("blur", _col(cols, "blur") < filters.min_blur),
        ("brightness", (_col(cols, "brightness") < filters.min_brightness) | (_col(cols, "brightness") > filters.max_brightness)),
        ("contrast", _col(cols, "contrast") < filters.min_contrast),
        ("entropy", _col(cols, "entropy") < filters.min_entropy),
        ("caption_length", (chars < filters.min_caption_chars) | (chars > filters.max_caption_chars)),
        ("text_length", (filters.max_text_chars >= 0) & (_col(cols, "text_chars") > filters.max_text_chars)),
    )
    for reason, bad in checks:
        hit = ok & bad & (out == "")
        out[hit] = reason
    return out


def duplicates(phash: np.ndarray, candidates: np.ndarray, seen: set[int] | None = None) -> np.ndarray:
    """Mask of candidate rows whose phash appeared before (in `seen` or earlier in this array).

    The first occurrence in order is kept; `seen` (if given) is updated with the kept hashes, so
    a streaming producer can carry it across batches.
    """
    seen = set() if seen is None else seen
    dup = np.zeros(len(phash), dtype=bool)
    for i in np.flatnonzero(candidates):
        p = int(phash[i])
        if p in seen:
            dup[i] = True
        else:
            seen.add(p)
    return dup


def select_mask(table: pa.Table, filters: FilterConfig) -> tuple[np.ndarray, np.ndarray]:
    """(accepted mask, reason per row) over a whole manifest table."""
    reasons = rejection_reasons(table, filters)
    if filters.drop_duplicates:
        dup = duplicates(_col(table, "phash", np.int64), reasons == "")
        reasons[dup] = "duplicate"
    return reasons == "", reasons


def select(table: pa.Table, filters: FilterConfig) -> pa.Table:
    """The rows of `table` that pass `filters` (same order)."""
    mask, _ = select_mask(table, filters)
    return table.filter(pa.array(mask, type=pa.bool_()))


# ----------------------------------------------------------------------------- storage


class ManifestWriter:
    """Buffers rows and publishes them as Parquet part files (atomic rename), every
    `flush_rows` rows and on `close`."""

    def __init__(self, directory: str | os.PathLike, flush_rows: int = 4096):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self._rows: list[dict] = []
        self._writer = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self.parts: list[Path] = []

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        self._seq += 1
        name = f"part-{time.time_ns():020d}-{self._writer}-{self._seq:05d}.parquet"
        with atomic_path(self.dir / name) as tmp:
            pq.write_table(table, tmp)
        self.parts.append(self.dir / name)
        self._rows = []

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_manifest(directory: str | os.PathLike) -> pa.Table:
    """All published parts as one table, the newest row per key (parts sort by time)."""
    parts = sorted(Path(directory).glob("part-*.parquet")) if Path(directory).is_dir() else []
    if not parts:
        return SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in parts])
    keys = table["key"].to_numpy(zero_copy_only=False)
    _, last_rev = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - last_rev)
    if len(keep) == len(keys):
        return table
    return table.take(pa.array(keep))
