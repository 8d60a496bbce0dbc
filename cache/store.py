"""The latent cache: encoded samples laid out per (encoder fingerprint, resolution bucket).

Layout::

    <cache dir>/<fingerprint>/<H>x<W>/seg-<writer id>-<seq>.safetensors

A *segment* (segment.py) is an immutable safetensors file holding the records of one `write`
call for one bucket, with every record's metadata and checksum in its header.

Why this shape:
- Publication is atomic (`utils/atomic.py`): a writer streams to a hidden `.tmp-...` file,
  fsyncs it and renames it to its final name (then fsyncs the directory). Readers list only
  `seg-*.safetensors`, so a writer killed at any point leaves at most a tmp file, never a torn
  or half-visible record. Writer ids (host, pid, random) make names unique, so any number of
  producer processes can write one cache concurrently without locks.
- Keyed by sample key *and* encoder fingerprint: a different VAE, MLLM, template or
  preprocessing lands in another directory, so it is a miss, never a stale hit.
- Reads are positional (`os.preadv` straight into the output tensor): a record costs two or
  three syscalls and one copy; segments of one bucket read back in order are a sequential scan.
- Readers build their key index lazily from segment headers and rescan on a miss, so records
  published by other processes after a reader opened the cache become visible.

If one key is published twice (two producers racing on it, or a rerun after a crash) the copies
are equivalent; readers keep the first segment in name order.

Integrity: each record carries a CRC-32 of its tensor bytes in the header, checked on every read
(with a check that its values are finite). A record that fails, a segment whose header does not
parse, does not match its data or its directory, or whose data is cut short, and stray entries
(`layout.py`: anything in a bucket directory that is not a segment, FIFOs, sockets,
symlinks and directories included, which are never opened) are *damage*: named (file and key),
counted in `LatentCache.damage`, skipped, never fatal; the index then treats the record as
missing, so a producer with encoders re-encodes it. Files are opened only through
`utils/regular_files.py`, so nothing here can block on an entry that is not a regular file.
`verify()` reads everything; with `repair`, a damaged segment's healthy records are written to a
new segment and the damaged file, like every stray, moves to `<cache dir>/quarantine/` (what
`mmdit cache verify --repair` and `mmdit produce` do); what cannot be moved is reported as
unrepaired, so a repair that leaves nothing unrepaired leaves a cache that verifies.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from mmdit.cache.layout import FINGERPRINT_RE, fingerprint_dirs, list_fingerprint, quarantine
from mmdit.cache.segment import (
    DamagedRecord,
    Segment,
    all_finite,
    encode_segment,
    read_segment_header,
    tensor_crc,
    validate_record,
    writer_id,
)
from mmdit.utils.atomic import TMP_PREFIX, atomic_write_bytes, remove_stale_tmp
from mmdit.utils.regular_files import open_regular

log = logging.getLogger("mmdit.cache")


class LatentCache:
    """Reader and writer of one cache directory; safe to share between threads of a process.

    Each process (or each `LatentCache` object) writes under its own writer id. Readers see
    every segment published before their last (re)scan; `read`/`contains` rescan on a miss and
    `keys`/`buckets` rescan always, so new segments of other producers show up.
    """

    MAX_OPEN_FILES = 128

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._writer = writer_id()
        self._seq = 0
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._index: dict[str, dict[str, tuple[Segment, int]]] = {}
        self._by_bucket: dict[str, dict[tuple[int, int], list[str]]] = {}
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, readers]
        self._damaged: dict[tuple[str, str], DamagedRecord] = {}
        self.damage: dict[str, str] = {}
        """What could not be read: "<file>" or "<file> record <key>" -> reason (see module doc)."""

    # ---- writing

    def write(self, records: list[dict]) -> None:
        """Publish `records`: one segment per (fingerprint, bucket), each atomically."""
        groups: dict[tuple[str, tuple[int, int]], list[dict]] = {}
        for rec in records:
            validate_record(rec)
            bucket = (int(rec["bucket"][0]), int(rec["bucket"][1]))
            groups.setdefault((rec["fingerprint"], bucket), []).append(rec)
        for (fp, bucket), recs in groups.items():
            self._publish(fp, bucket, encode_segment(fp, bucket, recs))

    def _publish(self, fingerprint: str, bucket: tuple[int, int], payload: list) -> None:
        d = self.path / fingerprint / f"{bucket[0]}x{bucket[1]}"
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._seq += 1
            name = f"seg-{self._writer}-{self._seq:06d}.safetensors"
        atomic_write_bytes(d / name, payload)

    def remove_stale_tmp(self, max_age_s: float = 3600.0) -> int:
        """Delete unpublished tmp files left by dead writers; returns how many.

        A tmp file of this host whose writer pid is gone is removed at once; others (another
        host's, or a live writer's) only when older than `max_age_s`.
        """
        return remove_stale_tmp(self.path, f"*/*/{TMP_PREFIX}*", max_age_s)

    # ---- reading

    def read(self, key: str, fingerprint: str) -> dict:
        """The record of `key` encoded under `fingerprint`; KeyError if absent, DamagedRecord if
        it fails its checksum (it then counts as absent)."""
        return self.read_many([key], fingerprint)[0]

    def read_many(self, keys: list[str], fingerprint: str) -> list[dict]:
        """Records of `keys`, in that order; KeyError for an absent key, DamagedRecord for one that
        fails its check. Keys that sit next to each other in a segment (a bucket's keys in listing
        order do) are read together, one read per run of records; the records' tensors are views
        of that read."""
        found, problems = self.read_available(keys, fingerprint)
        for key in keys:
            if key in problems:
                raise problems[key]
        return [found[k] for k in keys]

    def read_available(self, keys: list[str], fingerprint: str) -> tuple[dict[str, dict], dict[str, Exception]]:
        """The records of `keys` that are present and intact (key -> record), and why the others
        are not (key -> KeyError or DamagedRecord). Never raises for a single record."""
        found: dict[str, dict] = {}
        problems: dict[str, Exception] = {}
        located = []
        for key in dict.fromkeys(keys):
            try:
                located.append((key, self._locate(key, fingerprint)))
            except KeyError as e:
                problems[key] = self._damaged.get((fingerprint, key), e)
        for seg, i0, i1, _ in self._group_runs(located):
            try:
                records = self._records(seg, i0, i1, *self._read_span(seg, i0, i1))
            except DamagedRecord as e:
                records = [e] * (i1 - i0)
            for i, rec in zip(range(i0, i1), records):
                key = seg.records[i]["key"]
                why = rec if isinstance(rec, DamagedRecord) else self._check(seg, i, rec)
                if why is None:
                    found[key] = rec
                else:
                    problems[key] = self._mark_damaged(fingerprint, key, why)
        return found, problems

    @staticmethod
    def _check(seg: Segment, i: int, rec: dict) -> DamagedRecord | None:
        meta = seg.records[i]
        tensors = (rec["latents"], rec["prompt_embeds"], rec.get("cond_latents"))
        if "crc" in meta and tensor_crc(*tensors) != meta["crc"]:
            return DamagedRecord(seg.path, meta["key"], "checksum mismatch")
        if not all(all_finite(t) for t in tensors if t is not None):
            return DamagedRecord(seg.path, meta["key"], "non-finite values")
        return None

    def _mark_damaged(self, fingerprint: str, key: str, why: DamagedRecord) -> DamagedRecord:
        """Log and count a damaged record once; it leaves the index (a miss from now on)."""
        with self._lock:
            entry = self._index.get(fingerprint, {}).pop(key, None)
            if entry is not None:
                keys = self._by_bucket.get(fingerprint, {}).get(entry[0].bucket, [])
                if key in keys:
                    keys.remove(key)
            name = f"{why.path} record {key}"
            new = name not in self.damage
            self.damage[name] = why.reason
            self._damaged[(fingerprint, key)] = why
        if new:
            log.warning("damaged cache record, skipped: %s", why)
        return why

    def read_batch(self, keys: list[str], fingerprint: str) -> dict:
        """`keys` of one bucket as one batch, without per-record tensors: `latents` [B,16,h,w],
        `prompt_embeds` [B,Lmax,D] zero-padded, `prompt_mask` [B,Lmax] bool, `cond_latents`
        [B,16,h',w'] when every record has one (all of one shape), and the lists `keys`,
        `task`, `caption`, `source`. Tensors have the dtype their records are stored in (the
        wider one when segments differ: bf16 and fp32 features give fp32). ValueError if the
        records do not stack."""
        runs = self._runs(keys, fingerprint)
        metas = [None] * len(keys)
        for seg, i0, i1, where in runs:
            for i in range(i0, i1):
                for j in where[i]:
                    metas[j] = (seg, seg.records[i])
        buckets = {seg.bucket for seg, _ in metas}
        if len(buckets) != 1:
            raise ValueError(f"read_batch: keys span buckets {sorted(buckets)}; a batch holds one")
        conds = {tuple(m["cond_shape"]) if m["cond_shape"] else None for _, m in metas}
        if len(conds) != 1:
            raise ValueError(f"read_batch: records have different cond_latents shapes {conds}")
        cond_shape = conds.pop()
        lengths = [m["tokens"] for _, m in metas]
        b, lmax = len(keys), max(lengths)
        seg0 = metas[0][0]
        segs = [seg for seg, *_ in runs]
        lat_shape = seg0.tensors["latents"][1]
        lat_dtype = _widest(seg.tensors["latents"][0] for seg in segs)
        emb_dtype = _widest(seg.tensors["prompt_embeds"][0] for seg in segs)
        d = seg0.tensors["prompt_embeds"][1][1]
        # read straight into the batch tensors: no intermediate copy (unless a segment stores
        # another dtype), padding zeroed alone
        latents = torch.empty((b, *lat_shape[1:]), dtype=lat_dtype)
        embeds = torch.empty((b, lmax, d), dtype=emb_dtype)
        cond = torch.empty((b, *cond_shape), dtype=lat_dtype) if cond_shape else None
        stored: dict[int, tuple] = {}  # j -> its tensors as stored, what its CRC covers
        for seg, i0, i1, where in runs:
            with self._opened(seg.path) as fd:
                dest = [where[i][0] for i in range(i0, i1)]
                contiguous = dest == list(range(dest[0], dest[0] + len(dest)))
                seg_lat, shape, lat_off = seg.tensors["latents"]
                seg_emb, _, emb_off = seg.tensors["prompt_embeds"]
                per = shape[1] * shape[2] * shape[3] * seg_lat.itemsize
                if contiguous and seg_lat == lat_dtype:  # the common case: a bucket's keys in listing order
                    _pread_into(fd, latents[dest[0]:dest[0] + len(dest)], lat_off + i0 * per)
                    lat_of = {j: latents[j] for j in dest}
                else:
                    lat_of = {j: _read_as(fd, latents[j], lat_off + i * per, seg_lat)
                              for i, j in zip(range(i0, i1), dest)}
                tok = seg.token_offsets
                for i, j in zip(range(i0, i1), dest):
                    emb = _read_as(fd, embeds[j, :lengths[j]], emb_off + tok[i] * d * seg_emb.itemsize, seg_emb)
                    c = None
                    if cond is not None:
                        _, _, off = seg.tensors["cond_latents"]
                        c = _read_as(fd, cond[j], off + seg.cond_offsets[i] * seg_lat.itemsize, seg_lat)
                    stored[j] = (lat_of[j], emb, c)
                for i in range(i0, i1):  # a key asked for twice: copy the first read
                    for j in where[i][1:]:
                        latents[j] = latents[where[i][0]]
                        embeds[j] = embeds[where[i][0]]
                        if cond is not None:
                            cond[j] = cond[where[i][0]]
        for j, (seg, m) in enumerate(metas):  # the same checks as read_available
            if j in stored and "crc" in m and tensor_crc(*stored[j]) != m["crc"]:
                raise self._mark_damaged(fingerprint, m["key"], DamagedRecord(seg.path, m["key"], "checksum mismatch"))
        for j, n in enumerate(lengths):
            if n < lmax:
                embeds[j, n:].zero_()
        if not (all_finite(latents) and all_finite(embeds) and (cond is None or all_finite(cond))):
            raise DamagedRecord(seg0.path, None, "non-finite values in the batch")
        lengths = torch.tensor(lengths)
        out = {
            "keys": list(keys), "fingerprint": fingerprint, "bucket": seg0.bucket, "latents": latents,
            "prompt_embeds": embeds, "prompt_mask": torch.arange(lmax)[None, :] < lengths[:, None],
            "task": [m["task"] for _, m in metas], "caption": [m["caption"] for _, m in metas],
            "source": [m["source"] for _, m in metas],
        }
        if cond is not None:
            out["cond_latents"] = cond
        return out

    def meta(self, key: str, fingerprint: str) -> dict:
        """A record's metadata without reading tensors: key, fingerprint, bucket, task, caption,
        source, tokens (prompt length), cond_shape ([16, h, w] or None). KeyError if absent."""
        seg, i = self._locate(key, fingerprint)
        meta = {k: v for k, v in seg.records[i].items() if k != "crc"}
        return {**meta, "fingerprint": seg.fingerprint, "bucket": seg.bucket}

    def contains(self, key: str, fingerprint: str) -> bool:
        try:
            self._locate(key, fingerprint)
            return True
        except KeyError:
            return False

    def keys(self, fingerprint: str, bucket: tuple[int, int] | None = None) -> list[str]:
        """Published keys under `fingerprint` (in one bucket if given), in segment order."""
        if bucket is None:
            return [k for ks in self.buckets(fingerprint).values() for k in ks]
        return list(self.buckets(fingerprint).get((int(bucket[0]), int(bucket[1])), []))

    def buckets(self, fingerprint: str) -> dict[tuple[int, int], list[str]]:
        """bucket (H, W) -> keys, for every bucket with records under `fingerprint`."""
        self._scan(fingerprint)
        with self._lock:
            return {b: list(ks) for b, ks in sorted(self._by_bucket.get(fingerprint, {}).items())}

    def fingerprints(self) -> list[str]:
        """Fingerprints with at least one published segment."""
        return [fp for fp in fingerprint_dirs(self.path) if list_fingerprint(self.path, fp).segments]

    def segment_paths(self, fingerprint: str) -> list[str]:
        """Published segment files under `fingerprint`, sorted (for tools and benchmarks)."""
        return list_fingerprint(self.path, fingerprint).segments

    def verify(self, fingerprint: str | None = None, repair: bool = False) -> dict:
        """Read every record (of `fingerprint`, or of all) and check it, and name every stray.
        With `repair`, each damaged segment's intact records are published again in a new
        segment and the damaged file, like every stray, moves to quarantine/, so what is left to
        re-encode is exactly what was lost. Returns counts and the damage found, file and key
        named; `unrepaired` names what a repair could not fix (empty: the cache now verifies)."""
        if fingerprint and not FINGERPRINT_RE.match(fingerprint):
            raise ValueError(f"bad fingerprint {fingerprint!r}")
        report = {"segments": 0, "records": 0, "strays": 0, "damaged_segments": {}, "damaged_records": {},
                  "repaired_segments": 0, "quarantined": [], "unrepaired": {}}
        for fp in [fingerprint] if fingerprint else fingerprint_dirs(self.path):
            listing = list_fingerprint(self.path, fp)
            for path, why in listing.strays.items():
                report["strays"] += 1
                report["damaged_segments"][path] = why
                if repair:
                    self._repair(report, path)
            for path in listing.segments:
                report["segments"] += 1
                try:
                    seg = read_segment_header(path)
                except DamagedRecord as e:
                    report["damaged_segments"][path] = e.reason
                    if repair:
                        self._repair(report, path)
                    continue
                good, bad = self._verify_segment(fp, seg)
                report["records"] += len(good) + len(bad)
                if bad:
                    report["damaged_records"].update({f"{path} record {k}": why for k, why in bad.items()})
                    if repair and self._repair(report, path, good):
                        report["repaired_segments"] += 1
        self._forget_scans()
        return report

    def _verify_segment(self, fingerprint: str, seg: Segment) -> tuple[list[dict], dict[str, str]]:
        """A parsed segment's intact records, and the others' keys -> why."""
        keys = [r["key"] for r in seg.records]
        try:
            records = self._records(seg, 0, len(keys), *self._read_span(seg, 0, len(keys)))
        except DamagedRecord as e:
            records = [e] * len(keys)
        good, bad = [], {}
        for i, rec in enumerate(records):
            why = rec if isinstance(rec, DamagedRecord) else self._check(seg, i, rec)
            if why is None:
                good.append(rec)
            else:
                bad[keys[i]] = why.reason
                self._mark_damaged(fingerprint, keys[i], why)
        return good, bad

    def _repair(self, report: dict, path: str, intact: list[dict] = ()) -> bool:
        """Publish `intact` (records of the damaged file `path`) again, then quarantine `path`;
        True when both happened, else the entry is reported as unrepaired."""
        try:
            if intact:
                self.write([{**r, **{t: r[t].clone() for t in ("latents", "prompt_embeds")}} for r in intact])
            dest = quarantine(self.path, path)
        except (OSError, ValueError) as e:
            report["unrepaired"][path] = f"{type(e).__name__}: {e}"
            log.error("could not repair %s: %s", path, e)
            return False
        log.warning("moved damaged %s to %s", path, dest)
        report["quarantined"].append(dest)
        return True

    def _forget_scans(self) -> None:
        """Drop the index: the next read rescans (after a repair moved files)."""
        with self._lock:
            self._seen.clear()
            self._index.clear()
            self._by_bucket.clear()
            self._damaged.clear()

    def close(self) -> None:
        with self._lock:
            for fd, readers in self._fds.values():
                if readers == 0:  # descriptors in use are closed by their last reader
                    os.close(fd)
            self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals

    def _locate(self, key: str, fingerprint: str) -> tuple[Segment, int]:
        with self._lock:
            hit = self._index.get(fingerprint, {}).get(key)
        if hit is None:
            self._scan(fingerprint)
            with self._lock:
                hit = self._index.get(fingerprint, {}).get(key)
        if hit is None:
            raise KeyError(f"{key!r} not in cache {self.path} under fingerprint {fingerprint!r}")
        return hit

    def _scan(self, fingerprint: str) -> None:
        """Index segments published since the last scan (segments are immutable)."""
        if not FINGERPRINT_RE.match(fingerprint):
            raise ValueError(f"bad fingerprint {fingerprint!r}")
        listing = list_fingerprint(self.path, fingerprint)
        with self._lock:
            strays = {p: why for p, why in listing.strays.items() if p not in self.damage}
            self.damage.update(strays)
        for p, why in strays.items():  # named once; never opened
            log.warning("stray entry in the cache, skipped: %s: %s", p, why)
        new = [p for p in listing.segments if p not in self._seen]
        parsed = []
        for p in new:
            try:
                parsed.append(read_segment_header(p))
            except DamagedRecord as e:
                with self._lock:
                    self._seen.add(p)
                    self.damage[p] = e.reason
                log.warning("damaged cache segment, skipped: %s", e)
        with self._lock:
            index = self._index.setdefault(fingerprint, {})
            by_bucket = self._by_bucket.setdefault(fingerprint, {})
            for seg in parsed:
                if seg.path in self._seen:
                    continue
                self._seen.add(seg.path)
                for i, r in enumerate(seg.records):
                    if r["key"] not in index:
                        index[r["key"]] = (seg, i)
                        by_bucket.setdefault(seg.bucket, []).append(r["key"])

    @contextlib.contextmanager
    def _opened(self, path: str):
        """A read-only descriptor of `path` from a small LRU pool, held for the duration of a read.

        Descriptors are reference-counted: one evicted (or closed) while another thread reads
        through it is closed by its last reader, never under it (a closed number can be reused by
        the next open, and a read would then return another segment's bytes)."""
        with self._lock:
            entry = self._fds.get(path)
            if entry is None:
                entry = self._fds[path] = [open_regular(path), 0]  # never a FIFO swapped in
            else:
                self._fds.move_to_end(path)
            entry[1] += 1
            while len(self._fds) > self.MAX_OPEN_FILES:
                _, old = self._fds.popitem(last=False)
                if old[1] == 0:
                    os.close(old[0])
        try:
            yield entry[0]
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0 and self._fds.get(path) is not entry:
                    os.close(entry[0])

    def _runs(self, keys: list[str], fingerprint: str) -> list[tuple[Segment, int, int, dict[int, list[int]]]]:
        """Group `keys` into runs of consecutive records per segment: (segment, i0, i1, record
        index -> positions in `keys`)."""
        return self._group_runs([(key, self._locate(key, fingerprint)) for key in keys])

    @staticmethod
    def _group_runs(located: list) -> list[tuple[Segment, int, int, dict[int, list[int]]]]:
        by_segment: dict[str, tuple[Segment, dict[int, list[int]]]] = {}
        for j, (_, (seg, i)) in enumerate(located):
            by_segment.setdefault(seg.path, (seg, {}))[1].setdefault(i, []).append(j)
        runs = []
        for seg, wanted in by_segment.values():
            idx = sorted(wanted)
            start = 0
            while start < len(idx):
                end = start
                while end + 1 < len(idx) and idx[end + 1] == idx[end] + 1:
                    end += 1
                runs.append((seg, idx[start], idx[end] + 1, {i: wanted[i] for i in idx[start:end + 1]}))
                start = end + 1
        return runs

    def _read_span(self, seg: Segment, i0: int, i1: int):
        """Records i0..i1-1's tensors: latents [n,16,h,w], prompt_embeds [sum L, D], flat
        cond_latents or None. One positional read when the run's bytes of every tensor lie in
        one span (the run is most of its segment), else one read per tensor."""
        try:
            with self._opened(seg.path) as fd:
                return self._read_span_from(fd, seg, i0, i1)
        except OSError as e:  # truncated since the header was read, or gone
            raise DamagedRecord(seg.path, None, f"unreadable data ({e})") from None

    @staticmethod
    def _read_span_from(fd: int, seg: Segment, i0: int, i1: int):
        tok, co = seg.token_offsets, seg.cond_offsets
        want = {}  # name -> (dtype, shape, byte offset, byte length)
        dtype, shape, off = seg.tensors["latents"]
        per = shape[1] * shape[2] * shape[3] * dtype.itemsize
        want["latents"] = (dtype, (i1 - i0, *shape[1:]), off + i0 * per, (i1 - i0) * per)
        dtype, shape, off = seg.tensors["prompt_embeds"]
        row = shape[1] * dtype.itemsize
        want["prompt_embeds"] = (dtype, (tok[i1] - tok[i0], shape[1]), off + tok[i0] * row, (tok[i1] - tok[i0]) * row)
        if co[i1] > co[i0]:
            dtype, _, off = seg.tensors["cond_latents"]
            want["cond_latents"] = (dtype, (co[i1] - co[i0],), off + co[i0] * dtype.itemsize, (co[i1] - co[i0]) * dtype.itemsize)
        lo = min(w[2] for w in want.values()) // 64 * 64  # aligned file offsets copy faster
        hi = max(w[2] + w[3] for w in want.values())
        if hi - lo <= 1.25 * sum(w[3] for w in want.values()) + 64 and all((w[2] - lo) % 8 == 0 for w in want.values()):
            span = _pread(fd, torch.uint8, (hi - lo,), lo)
            got = {n: span[o - lo:o - lo + b].view(d).view(s) for n, (d, s, o, b) in want.items()}
        else:
            got = {n: _pread(fd, d, s, o) for n, (d, s, o, _) in want.items()}
        return got["latents"], got["prompt_embeds"], got.get("cond_latents")

    @staticmethod
    def _records(seg: Segment, i0: int, i1: int, latents, embeds, cond) -> list[dict]:
        """Per-record dicts whose tensors are views of a span read."""
        tok, co = seg.token_offsets, seg.cond_offsets
        lat = latents.unbind(0)  # one call for all views: per-record indexing costs more than the copy
        emb = embeds.split([tok[i + 1] - tok[i] for i in range(i0, i1)])
        cnd = cond.split([co[i + 1] - co[i] for i in range(i0, i1)]) if cond is not None else None
        out = []
        for n, i in enumerate(range(i0, i1)):
            meta = seg.records[i]
            rec = {
                "key": meta["key"], "fingerprint": seg.fingerprint, "bucket": seg.bucket, "task": meta["task"],
                "caption": meta["caption"], "source": meta["source"], "latents": lat[n], "prompt_embeds": emb[n],
            }
            if meta["cond_shape"]:
                rec["cond_latents"] = cnd[n].view(meta["cond_shape"])
            out.append(rec)
        return out


def _widest(dtypes) -> torch.dtype:
    """The dtype every one of `dtypes` converts to without loss (bf16 and fp32: fp32)."""
    return functools.reduce(torch.promote_types, dtypes)


def _read_as(fd: int, out: torch.Tensor, offset: int, stored: torch.dtype) -> torch.Tensor:
    """Fill `out` with the tensor stored at `offset` in dtype `stored` (converted when `out` has
    another); returns the tensor as stored (`out` itself when the dtypes agree)."""
    if stored == out.dtype:
        return _pread_into(fd, out, offset)
    got = _pread(fd, stored, tuple(out.shape), offset)
    out.copy_(got)
    return got


def _pread(fd: int, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """Read one tensor at `offset` straight into a fresh tensor's memory (no intermediate copy)."""
    return _pread_into(fd, torch.empty(shape, dtype=dtype), offset)


def _pread_into(fd: int, out: torch.Tensor, offset: int) -> torch.Tensor:
    """Fill the contiguous tensor `out` with the bytes at `offset`."""
    if out.numel() == 0:
        return out
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    got = os.preadv(fd, [buf], offset)
    while got < len(buf):  # short reads are legal (NFS, signals)
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise OSError(f"segment truncated at byte {offset + got}")
        got += n
    return out
