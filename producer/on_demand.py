"""Encoding on a cache miss: what a producer with encoders does for samples the plan selects but
the cache lacks (a loosened threshold, a new curriculum stage, a damaged record).

The samples are found through the manifest (its `url` names their shard), decoded and resized by
the same code as `mmdit produce` (producer/produce.py `prepare`, `Encoder`), encoded with the
release's VAE and Qwen2.5-VL, published to the cache (so every producer hits next time) and
returned. Thresholds are not applied here: the plan already chose these samples.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from pathlib import Path

from mmdit.cache import LatentCache, bucket_set, stage_fingerprint
from mmdit.config.data import FilterConfig

log = logging.getLogger("mmdit.producer")

_OPEN = FilterConfig(min_side=0, min_aspect=1e-9, max_aspect=1e9, min_caption_chars=0, max_caption_chars=10**9,
                     drop_duplicates=False)
"""Thresholds that pass everything: the plan's version filtered already."""


class OnDemandEncoder:
    """`encoder(keys, stage) -> records` for a `ProducerServer`; thread-safe (one batch at a time)."""

    def __init__(self, cfg, cache: LatentCache):
        from mmdit.cache import read_manifest_table
        from mmdit.producer.encoders import Encoders, other_edit_kinds

        self.cfg, self.cache = cfg, cache
        self.encoders = Encoders.load(cfg.encoders)
        for why in other_edit_kinds(cfg.cache.dir, self.encoders):
            log.warning("%s: they do not encode for it", why)
        manifest = read_manifest_table(Path(cfg.cache.dir))
        self.urls = {} if manifest is None else dict(zip(manifest.column("key").to_pylist(),
                                                         manifest.column("url").to_pylist()))
        self._lock = threading.Lock()

    def fingerprint(self, stage: int) -> str:
        return stage_fingerprint(self.encoders.fingerprint, stage or self.cfg.data.base_resolution)

    def __call__(self, keys: list[str], stage: int) -> list[dict]:
        from mmdit.producer.ingest import ErrorLog, SampleError, sample_key, tar_samples
        from mmdit.producer.produce import Context, Encoder, Report, prepare

        base = stage or self.cfg.data.base_resolution
        data = dataclasses.replace(self.cfg.data, base_resolution=base, filters=_OPEN)
        ctx = Context(data, bucket_set(base), self.encoders.preprocess_image)
        by_url = defaultdict(set)
        for key in keys:
            if key in self.urls:
                by_url[self.urls[key]].add(key)
        items, errors = [], ErrorLog()
        for url, wanted in sorted(by_url.items()):
            for raw in tar_samples([url], errors):
                if sample_key(raw) in wanted:
                    try:
                        items.append(prepare(raw, ctx))
                    except SampleError as e:
                        errors(e)
        groups = defaultdict(list)
        for it in items:
            groups[(it.row["task"], it.row["bucket_h"], it.row["bucket_w"], it.row.get("src_bucket_h"))].append(it)
        fingerprint = self.fingerprint(stage)
        encode = Encoder(self.encoders, fingerprint, Report(fingerprint, self.encoders.fingerprint, 0),
                         feature_dtype=self.cfg.cache.feature_dtype)
        records = []
        with self._lock:
            for (_, h, w, _), group in groups.items():
                records += encode(group, (h, w))
        if records:
            self.cache.write(records)
        found = {r["key"] for r in records}
        if len(found) < len(set(keys)):
            log.warning("could not encode %d of %d missing samples (not in the manifest or its shards; first: %s)",
                        len(set(keys) - found), len(set(keys)), sorted(set(keys) - found)[0])
        return records
