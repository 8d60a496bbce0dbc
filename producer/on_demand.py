"""Encoding on a cache miss: what a producer with encoders does for samples the plan selects but
the cache lacks (a loosened threshold, a new curriculum stage, a damaged record).

The samples are found through the manifest (its `url` names their shard), decoded and resized by
the same code as `mmdit produce` (producer/produce.py `prepare`, `Encoder`), encoded with the
release's VAE and Qwen2.5-VL, published to the cache (so every producer hits next time) and
returned. Thresholds are not applied here: the plan already chose these samples.

An annotation-caption record (`<key>#annotation`, data.caption_sources) is the sample's latents
with its annotation caption's features: the latents come from the sample's cached record, or are
encoded with it when that is missing too; the caption from the manifest's annotation.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict
from pathlib import Path

from mmdit.cache import LatentCache, bucket_set, stage_fingerprint
from mmdit.cache.segment import ANNOTATION_CAPTION
from mmdit.config.data import FilterConfig

log = logging.getLogger("mmdit.producer")

_OPEN = FilterConfig(min_side=0, min_aspect=1e-9, max_aspect=1e9, min_caption_chars=0, max_caption_chars=10**9,
                     drop_duplicates=False)
"""Thresholds that pass everything: the plan's version filtered already."""


class OnDemandEncoder:
    """`encoder(keys, stage) -> records` for a `ProducerServer`; thread-safe (one batch at a time)."""

    def __init__(self, cfg, cache: LatentCache):
        from mmdit.cache import read_manifest_table
        from mmdit.producer.annotate.answers import annotation_caption
        from mmdit.producer.encoders import Encoders, other_edit_kinds

        self.cfg, self.cache = cfg, cache
        self.encoders = Encoders.load(cfg.encoders)
        for why in other_edit_kinds(cfg.cache.dir, self.encoders):
            log.warning("%s: they do not encode for it", why)
        manifest = read_manifest_table(Path(cfg.cache.dir))
        rows = [] if manifest is None else manifest.select(["key", "url", "annotation_status", "annotation"]).to_pylist()
        self.urls = {r["key"]: r["url"] for r in rows}
        self.captions = {r["key"]: c for r in rows if (c := annotation_caption(r)) is not None}
        """key -> its annotation caption (the manifest's, as the service's plan saw it)."""
        self._lock = threading.Lock()

    def fingerprint(self, stage: int) -> str:
        return stage_fingerprint(self.encoders.fingerprint, stage or self.cfg.data.base_resolution)

    def __call__(self, keys: list[str], stage: int) -> list[dict]:
        """The records of `keys` (sample keys and `#annotation` keys), encoded and published."""
        fingerprint = self.fingerprint(stage)
        variants = [k.removesuffix(ANNOTATION_CAPTION) for k in keys if k.endswith(ANNOTATION_CAPTION)]
        variants = [k for k in variants if k in self.captions]  # the samples whose caption records are asked for
        originals, _ = self.cache.read_available(variants, fingerprint) if variants else ({}, {})
        samples = {k for k in keys if not k.endswith(ANNOTATION_CAPTION)} | (set(variants) - set(originals))
        records = self._encode(sorted(samples), stage) if samples else []
        originals.update({r["key"]: r for r in records if r["key"] in self.captions})
        ready = [k for k in variants if k in originals]
        if ready:
            encode = self._encoder(fingerprint)
            with self._lock:
                captions = encode.caption_variants([originals[k] for k in ready], [self.captions[k] for k in ready])
            self.cache.write(captions)
            records += captions
        wanted = set(keys)
        found = {r["key"] for r in records} & wanted
        if len(found) < len(wanted):
            log.warning("could not encode %d of %d missing records (not in the manifest or its shards, or no "
                        "annotation caption; first: %s)", len(wanted - found), len(wanted), sorted(wanted - found)[0])
        return records

    def _encoder(self, fingerprint: str):
        from mmdit.producer.produce import Encoder, Report

        return Encoder(self.encoders, fingerprint, Report(fingerprint, self.encoders.fingerprint, 0),
                       feature_dtype=self.cfg.cache.feature_dtype)

    def _encode(self, keys: list[str], stage: int) -> list[dict]:
        """Samples `keys` decoded from their shards, encoded and published."""
        from mmdit.producer.ingest import ErrorLog, SampleError, sample_key, tar_samples
        from mmdit.producer.produce import Context, prepare

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
        encode = self._encoder(self.fingerprint(stage))
        records = []
        with self._lock:
            for (_, h, w, _), group in groups.items():
                records += encode(group, (h, w))
        if records:
            self.cache.write(records)
        return records
