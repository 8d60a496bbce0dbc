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

import dataclasses
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdit.cache.categories import FROM_ANNOTATION, overrides
from mmdit.cache.keys import check_key
from mmdit.config.data import FilterConfig
from mmdit.utils.atomic import atomic_path
from mmdit.utils.regular_files import kind_of, open_regular_file

log = logging.getLogger("mmdit.manifest")

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
    ("category", pa.string()),       # cache/categories.py; '' unknown
    ("category_source", pa.string()),  # metadata | annotation | source
    # `mmdit annotate` (producer/annotate/run.py); null: not annotated / not scored
    ("alignment", pa.float32()),     # image-caption similarity of the alignment model (cosine, -1..1)
    ("annotation_status", pa.string()),  # ok | unparseable | invalid
    ("annotation", pa.string()),     # the validated JSON object, or the model's raw output when it failed
    ("watermark", pa.bool_()),
    ("qr_code", pa.bool_()),
    ("mosaic", pa.bool_()),
    ("visible_text", pa.string()),
    ("style", pa.string()),
])
OK = "ok"
ANNOTATION_COLUMNS = ("alignment", "annotation_status", "annotation", "watermark", "qr_code", "mosaic", "visible_text",
                      "style")
"""What `mmdit annotate` adds to a row (the category aside)."""
REASONS = ("min_side", "aspect", "blur", "brightness", "saturation", "contrast", "entropy", "caption_length", "text_length",
           "alignment", "watermark", "qr_code", "mosaic", "not_curated", "duplicate")
"""Filter rejection reasons, in the order they are checked (a row counts under its first)."""


# ----------------------------------------------------------------------------- selection


def _col(cols, name, dtype=np.float64, nan=0) -> np.ndarray:
    """Column `name` as numpy; missing scores (rows that failed to decode, samples not annotated,
    or a manifest written before the column existed) read as `nan` (0 unless told)."""
    if name not in (cols.column_names if isinstance(cols, pa.Table) else cols):
        rows = cols.num_rows if isinstance(cols, pa.Table) else len(next(iter(cols.values())))
        return np.full(rows, nan, dtype=dtype)
    v = cols[name]
    if isinstance(v, (pa.ChunkedArray, pa.Array)):
        if dtype is object:
            v = v.to_pylist()
        else:
            v = [nan if x is None else x for x in v.to_pylist()]
    elif dtype is not object:
        v = [nan if x is None else x for x in v]
    return np.asarray(v, dtype=dtype)


ANNOTATION_FILTERS = {"min_alignment": -1.0, "drop_watermark": False, "drop_qr_code": False, "drop_mosaic": False}
"""Thresholds on what `mmdit annotate` adds, and their off values."""


def ingest_filters(filters: FilterConfig) -> FilterConfig:
    """`filters` without the thresholds on annotations: `mmdit produce` runs before `mmdit
    annotate`, so it encodes what passes the rest, and the plan applies them once annotated.
    Nor the curated list: a curated set is chosen from what is cached."""
    return dataclasses.replace(filters, **ANNOTATION_FILTERS, curated_list="")


def read_key_list(path: str | os.PathLike) -> frozenset[str]:
    """The sample keys of a key-list file (filters.curated_list): one per line, blank lines and
    lines starting with `#` skipped."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


def _not_curated(cols, curated_list: str) -> np.ndarray | bool:
    if not curated_list:
        return False
    curated = read_key_list(curated_list)
    return np.asarray([k not in curated for k in _col(cols, "key", object)], dtype=bool)


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
        ("saturation", _col(cols, "saturation") > filters.max_saturation),
        ("contrast", _col(cols, "contrast") < filters.min_contrast),
        ("entropy", _col(cols, "entropy") < filters.min_entropy),
        ("caption_length", (chars < filters.min_caption_chars) | (chars > filters.max_caption_chars)),
        ("text_length", (filters.max_text_chars >= 0) & (_col(cols, "text_chars") > filters.max_text_chars)),
        # a sample never scored for alignment fails any threshold above -1 (it is not known to pass)
        ("alignment", (filters.min_alignment > -1.0) & ~(_col(cols, "alignment", nan=-np.inf) >= filters.min_alignment)),
        ("watermark", filters.drop_watermark & (_col(cols, "watermark") > 0)),
        ("qr_code", filters.drop_qr_code & (_col(cols, "qr_code") > 0)),
        ("mosaic", filters.drop_mosaic & (_col(cols, "mosaic") > 0)),
        ("not_curated", _not_curated(cols, filters.curated_list)),
    )
    for reason, bad in checks:
        hit = ok & bad & (out == "")
        out[hit] = reason
    return out


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit perceptual hashes (for near-duplicate checks)."""
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")


class PhashIndex:
    """Perceptual hashes seen so far, answering "is there one within `max_distance` bits?".

    Multi-index hashing: the 64 bits are cut into `max_distance + 1` bands; two hashes within
    `max_distance` bits agree exactly on at least one band (pigeonhole), so only the hashes sharing
    a band with the query are compared. Exact duplicates (distance 0) are one set lookup.
    """

    def __init__(self, max_distance: int = 0):
        if not 0 <= max_distance <= 16:
            raise ValueError(f"a phash distance must be in 0..16, got {max_distance}")
        self.max_distance = max_distance
        cuts = np.linspace(0, 64, max_distance + 2).round().astype(int)
        self.bands = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]

    def _keys(self, h: int):
        u = h & 0xFFFFFFFFFFFFFFFF
        for a, b in self.bands:
            yield (u >> a) & ((1 << (b - a)) - 1)

    def near(self, h: int) -> bool:
        for table, key in zip(self.tables, self._keys(h)):
            for other in table.get(key, ()):
                if hamming(h, other) <= self.max_distance:
                    return True
        return False

    def add(self, h: int) -> None:
        for table, key in zip(self.tables, self._keys(h)):
            table.setdefault(key, []).append(h)


def duplicates(phash: np.ndarray, candidates: np.ndarray, seen: PhashIndex | None = None,
               max_distance: int = 0) -> np.ndarray:
    """Mask of candidate rows whose phash is within `max_distance` bits of one kept before (in
    `seen` or earlier in this array).

    The first occurrence in order is kept; `seen` (if given) is updated with the kept hashes, so
    a streaming producer can carry it across batches (its own distance then applies).
    """
    seen = PhashIndex(max_distance) if seen is None else seen
    dup = np.zeros(len(phash), dtype=bool)
    for i in np.flatnonzero(candidates):
        p = int(phash[i])
        if seen.near(p):
            dup[i] = True
        else:
            seen.add(p)
    return dup


def select_mask(table: pa.Table, filters: FilterConfig) -> tuple[np.ndarray, np.ndarray]:
    """(accepted mask, reason per row) over a whole manifest table."""
    reasons = rejection_reasons(table, filters)
    if filters.drop_duplicates:
        dup = duplicates(_col(table, "phash", np.int64), reasons == "", max_distance=filters.duplicate_distance)
        reasons[dup] = "duplicate"
    return reasons == "", reasons


def select(table: pa.Table, filters: FilterConfig) -> pa.Table:
    """The rows of `table` that pass `filters` (same order)."""
    mask, _ = select_mask(table, filters)
    return table.filter(pa.array(mask, type=pa.bool_()))


def carry_annotations(row: dict, previous: dict | None) -> dict:
    """`row`, a sample described again (e.g. by `mmdit produce` at a new stage), with what `mmdit
    annotate` found for it before: annotating is expensive and the image has not changed."""
    kept = {c: previous[c] for c in ANNOTATION_COLUMNS if previous and previous.get(c) is not None}
    if not kept:
        return row
    row = {**row, **kept}
    if previous.get("category_source") == FROM_ANNOTATION and overrides(row.get("category_source"), FROM_ANNOTATION):
        row["category"], row["category_source"] = previous["category"], FROM_ANNOTATION
    if kept.get("annotation_status") == OK:
        row["text_chars"] = max(row.get("text_chars") or 0, len(kept.get("visible_text") or ""))
    return row


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
        check_key(row["key"])  # cache/keys.py: a key that could name a path is never stored
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


def manifest_parts(directory: str | os.PathLike) -> list[Path]:
    """The published part files, sorted (by time). An entry named like a part that is not a
    regular file (a FIFO, a socket, a directory, a symlink) is logged by name and skipped,
    never opened: a FIFO would block its reader."""
    try:
        with os.scandir(directory) as it:
            entries = [e for e in it if e.name.startswith("part-") and e.name.endswith(".parquet")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    parts = []
    for e in entries:
        try:
            regular = e.is_file(follow_symlinks=False)
            kind = "regular file" if regular else kind_of(e.stat(follow_symlinks=False).st_mode)
        except FileNotFoundError:
            continue
        if regular:
            parts.append(Path(e.path))
        else:
            log.warning("manifest: skipped %s: a %s, not a regular file", e.path, kind)
    return sorted(parts)


def read_manifest(directory: str | os.PathLike) -> pa.Table:
    """All published parts as one table, the newest row per key (parts sort by time)."""
    parts = manifest_parts(directory)
    if not parts:
        return SCHEMA.empty_table()
    tables = []
    for p in parts:
        with open_regular_file(p) as f:  # checked again on the descriptor: swapped entries too
            tables.append(pq.read_table(f, schema=SCHEMA))
    table = pa.concat_tables(tables)
    keys = table["key"].to_numpy(zero_copy_only=False)
    _, last_rev = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - last_rev)
    if len(keep) == len(keys):
        return table
    return table.take(pa.array(keep))


def read_manifest_table(cache_dir: Path):
    """The cache's manifest (its `manifest/` directory), or None when it has none."""
    manifest_dir = Path(cache_dir) / "manifest"
    if not manifest_dir.is_dir():
        return None
    table = read_manifest(manifest_dir)
    return table if table.num_rows else None
