"""`mmdit produce`: shards -> decode -> score -> manifest -> filter -> bucket -> encode -> cache.

    mmdit produce data.shards='[shards/synth-{000000..000003}.tar]' cache.dir=cache encoders.dir=enc

Three kinds of work overlap, because encoding is the expensive part and must never wait:
- a reader thread walks the tar shards and hands every sample to a pool of decode workers
  (PIL decode, scores, filter rules, resize + centre crop: all release the GIL for their heavy
  parts), keeping a bounded window of futures in shard order;
- the main thread takes prepared samples in order, drops duplicates, groups them per bucket
  (and source bucket, for edits) and encodes a group when it holds a full batch, or, whenever
  the next sample is not decoded yet, the fullest group (work-conserving: when decoding is the
  bottleneck, partial batches cost nothing);
- a writer thread publishes encoded records to the cache while the next batch encodes.

Work already in the cache under the same fingerprint (the encoders' plus the bucket set, see
`cache.stage_fingerprint`) is skipped: a sample described in the manifest and present in the
cache is not even decoded again, so a second run over the same shards encodes nothing. A killed
run leaves only published segments and manifest parts; the next run removes the dead writer's
tmp files and encodes the rest.

Annotation captions (data.caption_sources.annotation > 0): after the pass, every cached
text-to-image sample whose `mmdit annotate` answer parsed and that has no `<key>#annotation`
record yet gets one: its latents read back from the cache, its annotation caption encoded (the
one text-encoder forward it costs; nothing is decoded). So `mmdit produce` after `mmdit annotate`
encodes exactly the annotation captions; samples whose annotation failed are counted and keep
their original caption (report.json `caption_variants`).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from mmdit.cache import (
    ANNOTATION_COLUMNS,
    BAD_KEY,
    OK,
    PAIR,
    RECONSTRUCTION,
    LatentCache,
    ManifestWriter,
    PhashIndex,
    ShardClaims,
    assign_bucket,
    bucket_set,
    carry_annotations,
    duplicates,
    ingest_filters,
    read_manifest,
    rejection_reasons,
    stage_fingerprint,
)
from mmdit.cache.categories import from_ingest
from mmdit.cache.segment import ANNOTATION_CAPTION
from mmdit.config.data import DataConfig
from mmdit.config.produce import CacheConfig
from mmdit.producer.encoders import preprocess_image
from mmdit.producer.ingest import ErrorLog, SampleError, decode_sample, expand_shards, sample_key, tar_samples
from mmdit.producer.scores import score_sample
from mmdit.utils.atomic import atomic_write_json
from mmdit.utils.dtypes import resolve_dtype

log = logging.getLogger("mmdit.produce")

MANIFEST_DIR = "manifest"
REPORT = "report.json"
SHARD_ERRORS = ("truncated_tar", "shard_missing", "shard_unreadable")
CACHE_RESCAN_S = 10.0
"""How often the producer refreshes its view of keys other producers have cached."""


@dataclass
class Item:
    """One sample on its way through the pipeline (prepared by a decode worker)."""

    key: str
    row: dict
    caption: str = ""
    reason: str = ""
    """'' if it passes the score filters (duplicates are decided later, in order)."""
    cached: bool = False
    """Described in the manifest and already in the cache: nothing was decoded."""
    converted: list[str] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    src_pixels: torch.Tensor | None = None
    src_image: Image.Image | None = None


@dataclass
class Context:
    data: DataConfig
    buckets: tuple[tuple[int, int], ...]
    preprocess: Callable[[Image.Image, tuple[int, int]], torch.Tensor]
    """Resize + centre crop to (H, W) -> [3, H, W] in [-1, 1]: the encoders' own (fingerprinted)."""


def manifest_row(sample: dict, scores: dict, bucket: tuple[int, int], data: DataConfig) -> dict:
    category, category_source = from_ingest(sample["meta"], sample["source"], data.source_categories)
    return {
        "key": sample["key"], "url": sample["url"], "source": sample["source"], "task": sample["task"],
        "status": OK, "detail": ",".join(sample["converted"]), **scores,
        "base_resolution": data.base_resolution, "bucket_h": bucket[0], "bucket_w": bucket[1],
        "category": category, "category_source": category_source,
    }


def error_row(e: SampleError, base: int) -> dict:
    return {"key": e.key, "url": e.url, "status": e.reason, "detail": e.detail[:500], "base_resolution": base}


def prepare(raw: dict, ctx: Context) -> Item:
    """Decode worker: decode, score, apply the score filters, resize accepted images to their bucket."""
    sample = decode_sample(raw, ctx.data.max_image_pixels)
    scores = score_sample(sample)
    bucket = assign_bucket(scores["width"], scores["height"], ctx.buckets)
    row = manifest_row(sample, scores, bucket, ctx.data)
    reason = rejection_reasons({k: [v] for k, v in row.items()}, ingest_filters(ctx.data.filters))[0]
    item = Item(sample["key"], row, sample["caption"], reason, converted=sample["converted"])
    if sample["task"] == "edit":
        row["src_bucket_h"], row["src_bucket_w"] = assign_bucket(*sample["source_image"].size, ctx.buckets)
    elif sample["task"] == PAIR:  # the rejected image goes to the preferred image's bucket, whatever its aspect
        row["src_bucket_h"], row["src_bucket_w"] = bucket
    if not reason:
        item.pixels = ctx.preprocess(sample["image"], bucket)
        if sample["task"] == "edit":
            item.src_pixels = ctx.preprocess(sample["source_image"], (row["src_bucket_h"], row["src_bucket_w"]))
            item.src_image = to_pil(item.src_pixels)  # Qwen2.5-VL sees what cond_latents encode
        elif sample["task"] == PAIR:  # resized and centre-cropped to it (scores, filters: the preferred image's)
            item.src_pixels = ctx.preprocess(sample["source_image"], bucket)
    return item


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] (from 8-bit pixels) -> the same 8-bit RGB image, exactly."""
    a = pixels.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a, "RGB")


def reuse(row: dict, ctx: Context) -> Item:
    """An item for a sample already described in the manifest and cached: no decode."""
    row = dict(row)
    if row["base_resolution"] != ctx.data.base_resolution:
        row["bucket_h"], row["bucket_w"] = assign_bucket(row["width"], row["height"], ctx.buckets)
        if row["task"] == PAIR:
            row["src_bucket_h"], row["src_bucket_w"] = row["bucket_h"], row["bucket_w"]
        elif row.get("src_width"):
            row["src_bucket_h"], row["src_bucket_w"] = assign_bucket(row["src_width"], row["src_height"], ctx.buckets)
        row["base_resolution"] = ctx.data.base_resolution
    reason = rejection_reasons({k: [v] for k, v in row.items()}, ingest_filters(ctx.data.filters))[0]
    return Item(row["key"], row, reason=reason, cached=True)


class Report:
    """Counters of one run, written as report.json.

    seen = accepted + sum(rejected) + decode/shard errors; accepted = encoded + cache_hits +
    errors["encode_failed"]; `categories` and `tasks` split the accepted samples. `rejected` counts filter reasons (cache/manifest.py REASONS),
    `errors` unusable input by reason (producer/ingest.py), `converted` images that were usable
    after a conversion (cmyk, 16bit, palette, alpha, ...).
    """

    def __init__(self, fingerprint: str, encoders_fingerprint: str, shards: int):
        self.fingerprint, self.encoders_fingerprint, self.shards = fingerprint, encoders_fingerprint, shards
        self.seen = self.accepted = self.encoded = self.cache_hits = self.reconstruction = 0
        self.rejected: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()
        self.buckets: Counter[str] = Counter()
        self.tasks: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.encode_seconds = 0.0
        self.start = time.perf_counter()

    def as_dict(self, errors: Counter) -> dict:
        seconds = time.perf_counter() - self.start
        return {
            "seen": self.seen, "accepted": self.accepted, "rejected": dict(sorted(self.rejected.items())),
            "encoded": self.encoded, "cache_hits": self.cache_hits, "reconstruction": self.reconstruction,
            "errors": dict(sorted(errors.items())),
            "converted": dict(sorted(self.converted.items())), "buckets": dict(sorted(self.buckets.items())),
            "tasks": dict(sorted(self.tasks.items())), "categories": dict(sorted(self.categories.items())),
            "fingerprint": self.fingerprint,
            "encoders_fingerprint": self.encoders_fingerprint, "shards": self.shards,
            "seconds": round(seconds, 3), "encode_seconds": round(self.encode_seconds, 3),
            "encoded_per_second": round(self.encoded / seconds, 3) if seconds > 0 else 0.0,
        }


class Writer:
    """Background publisher of encoded records: it gathers them into segments of at least
    `min_records`, or whatever it holds once the oldest has waited `max_delay_s`."""

    def __init__(self, cache: LatentCache, min_records: int, max_delay_s: float):
        self.cache, self.min_records, self.max_delay_s = cache, min_records, max_delay_s
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(self, records: list[dict]) -> None:
        if self.error:
            raise RuntimeError("cache writer failed") from self.error
        self.q.put(records)

    def _run(self) -> None:
        pending: list[dict] = []
        oldest = 0.0
        done = False
        while not done:
            timeout = None if not pending else max(0.0, oldest + self.max_delay_s - time.monotonic())
            try:
                recs = self.q.get(timeout=timeout)
                done = recs is None
                if recs:
                    oldest = oldest if pending else time.monotonic()
                    pending.extend(recs)
            except queue.Empty:
                pass
            due = done or len(pending) >= self.min_records or time.monotonic() - oldest >= self.max_delay_s
            if pending and due:
                try:
                    if not self.error:
                        self.cache.write(pending)
                except BaseException as e:  # surfaced to the main thread on its next put/close
                    self.error = e
                pending = []

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise RuntimeError("cache writer failed") from self.error


def _read_ahead(raws, pool: ThreadPoolExecutor, ctx: Context, known: dict, out: queue.Queue, stop: threading.Event):
    """Reader thread: raw samples -> futures (or ready items for cached samples), in order."""
    try:
        for raw in raws:
            if stop.is_set():
                return
            row = known.get(sample_key(raw))
            if row is not None:
                fut: Future = Future()
                fut.set_result(reuse(row, ctx))
            else:
                fut = pool.submit(prepare, raw, ctx)
            out.put(fut)
        out.put(None)
    except BaseException as e:  # a bug, not bad data (bad data goes to the handler)
        out.put(e)


class Encoder:
    """Runs the encoders on one bucket batch and builds its cache records: latents in fp32,
    prompt features in `feature_dtype` (cache.feature_dtype)."""

    def __init__(self, encoders, fingerprint: str, report: Report, batch_hook=None, reconstruction: bool = False,
                 feature_dtype: str = CacheConfig.feature_dtype):
        self.enc, self.fp, self.report, self.batch_hook = encoders, fingerprint, report, batch_hook
        self.reconstruction = reconstruction
        self.feature_dtype = resolve_dtype(feature_dtype, "cpu")

    def _features(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds.to(self.feature_dtype).contiguous()

    def __call__(self, items: list[Item], bucket: tuple[int, int]) -> list[dict]:
        t0 = time.perf_counter()
        task = items[0].row["task"]
        captions = [it.caption for it in items]
        pixels = torch.stack([it.pixels for it in items])  # [B, 3, H, W]
        latents = self.enc.encode_images(pixels)  # [B, 16, H/8, W/8]
        src_pixels = src_images = cond = None
        if task == "edit":
            src_pixels = torch.stack([it.src_pixels for it in items])  # [B, 3, h, w]
            src_images = [it.src_image for it in items]
            cond = self.enc.encode_images(src_pixels)  # [B, 16, h/8, w/8]
            embeds = self.enc.encode_edit_prompts(captions, src_images)
        elif task == PAIR:  # the rejected images (in the preferred ones' bucket); the prompt once, text-to-image
            src_pixels = torch.stack([it.src_pixels for it in items])  # [B, 3, H, W]
            cond = self.enc.encode_images(src_pixels)  # [B, 16, H/8, W/8]
            embeds = self.enc.encode_prompts(captions)
        else:
            embeds = self.enc.encode_prompts(captions)
        self.report.encode_seconds += time.perf_counter() - t0
        if self.batch_hook is not None:
            self.batch_hook(task, pixels, captions, src_pixels, src_images)
        records = []
        for i, it in enumerate(items):
            rec = {
                "key": it.key, "fingerprint": self.fp, "bucket": bucket, "task": task, "caption": captions[i],
                "source": it.row["source"], "latents": latents[i].float().contiguous(),
                "prompt_embeds": self._features(embeds[i]),
            }
            if cond is not None:
                rec["cond_latents"] = cond[i].float().contiguous()
            records.append(rec)
        if self.reconstruction:
            records += self._reconstruction(items, bucket, latents, pixels)
        return records

    def caption_variants(self, originals: list[dict], captions: list[str]) -> list[dict]:
        """`<key>#annotation` records: each cached original's latents with the features of its
        annotation caption (text-to-image: `encode_prompts`)."""
        t0 = time.perf_counter()
        embeds = self.enc.encode_prompts(captions)
        self.report.encode_seconds += time.perf_counter() - t0
        return [{"key": o["key"] + ANNOTATION_CAPTION, "fingerprint": self.fp, "bucket": tuple(o["bucket"]),
                 "task": "t2i", "caption": caption, "source": o["source"], "latents": o["latents"].contiguous(),
                 "prompt_embeds": self._features(e)}
                for o, caption, e in zip(originals, captions, embeds, strict=True)]

    def _reconstruction(self, items: list[Item], bucket, latents: torch.Tensor, pixels: torch.Tensor) -> list[dict]:
        """Reconstruction records: the target's latents are also the condition, and the target
        image is the vision input of an edit-style prompt carrying the caption."""
        t0 = time.perf_counter()
        images = [to_pil(p) for p in pixels]  # what the VAE encoded, exactly
        embeds = self.enc.encode_edit_prompts([it.caption for it in items], images)
        self.report.encode_seconds += time.perf_counter() - t0
        self.report.reconstruction += len(items)
        return [{"key": it.key + RECONSTRUCTION, "fingerprint": self.fp, "bucket": bucket, "task": "reconstruction",
                 "caption": it.caption, "source": it.row["source"], "latents": latents[i].float().contiguous(),
                 "cond_latents": latents[i].float().contiguous(), "prompt_embeds": self._features(embeds[i])}
                for i, it in enumerate(items)]


class CacheBuilder:
    """The offline encoder: one run of the pipeline over `data.shards` into the cache at
    `cache_cfg.dir` (what `mmdit produce` runs; the online `ProducerServer` only serves)."""

    def __init__(self, data: DataConfig, cache_cfg: CacheConfig, encoders, progress: bool | None = None, batch_hook=None):
        self.data, self.cache_cfg = data, cache_cfg
        self.dir = Path(cache_cfg.dir)
        self.cache = LatentCache(self.dir)
        self.cache.remove_stale_tmp()
        self.fp = stage_fingerprint(encoders.fingerprint, data.base_resolution)
        self._check_kind(encoders)
        self.repair = self.cache.verify(self.fp, repair=True)  # damaged records are re-encoded below
        self.urls = expand_shards(data.shards)
        if not self.urls:
            raise ValueError(f"data.shards {data.shards!r} matches no shard")
        self.ctx = Context(data, bucket_set(data.base_resolution), getattr(encoders, "preprocess_image", preprocess_image))
        self.report = Report(self.fp, encoders.fingerprint, len(self.urls))
        self.errors = ErrorLog()
        self.encode = Encoder(encoders, self.fp, self.report, batch_hook, data.reconstruction, cache_cfg.feature_dtype)
        self.cached = set(self.cache.keys(self.fp))
        self.last_scan = time.monotonic()
        self.known = self._known_rows()
        self.manifest = ManifestWriter(self.dir / MANIFEST_DIR)
        self.seen_phash = PhashIndex(data.filters.duplicate_distance)
        self.groups: dict[tuple, list[Item]] = defaultdict(list)
        self.progress = progress

    def _check_kind(self, encoders) -> None:
        """Refuse (exit 2) to add records of one edit conditioning to a cache recorded with
        another (producer/encoders.py `other_edit_kinds`); record this run's kind."""
        from mmdit.config import ConfigError
        from mmdit.producer.encoders import other_edit_kinds, record_cache_kind

        if not hasattr(encoders, "description"):  # a stand-in without edit conditioning (benchmarks)
            return
        clash = other_edit_kinds(self.dir, encoders)
        if clash:
            raise ConfigError(f"{clash[0]}: use another cache.dir, or encoders.edit_template to match it")
        record_cache_kind(self.dir, self.fp, encoders)

    def _known_rows(self) -> dict[str, dict]:
        """Manifest rows of samples already cached under this fingerprint: no need to decode them.
        Also keeps every sample's annotations, which a row written again must carry over."""
        prior = read_manifest(self.dir / MANIFEST_DIR)
        self.annotated: dict[str, dict] = {}
        if not prior.num_rows:
            return {}
        rows = prior.filter(pc.equal(prior["status"], OK)).to_pylist()
        self.annotated = {r["key"]: r for r in rows if any(r.get(c) is not None for c in ANNOTATION_COLUMNS)}
        return {r["key"]: r for r in rows if self._complete(r["key"])}

    def _complete(self, key: str) -> bool:
        """Is everything this run writes for `key` cached (its reconstruction record too)?"""
        return key in self.cached and (not self.data.reconstruction or key + RECONSTRUCTION in self.cached)

    def run(self) -> dict:
        """Claim the shards no other `mmdit produce` on this cache is working on, process them,
        then wait for the others' claims and process the rest (mostly cache hits by then): two
        runs over the same shards split the work instead of encoding everything twice."""
        self.writer = Writer(self.cache, self.cache_cfg.segment_records, self.cache_cfg.segment_seconds)
        bar = _progress_bar(self.progress)
        claims = ShardClaims(self.dir)
        try:
            mine = claims.take(self.urls)
            self._pass(mine, bar)
            rest = [u for u in self.urls if u not in set(mine)]
            if rest:
                claims.wait(rest)
                self.cached = set(self.cache.keys(self.fp))
                self.known = self._known_rows()
                self._pass(rest, bar)
        finally:
            try:  # publish everything before the claims go: a waiting run then sees it all as cached
                self.writer.close()
                self._finish_manifest()
            finally:
                claims.release()
                bar.close()
        variants = self._caption_variants()
        out = self.report.as_dict(self.errors.counts)
        if variants is not None:
            out["caption_variants"] = variants
        out["cache_repair"] = {k: self.repair[k] for k in ("damaged_segments", "damaged_records", "quarantined")}
        failed = [e for e in self.errors.errors if e.reason == "encode_failed"]
        if failed:
            out["first_encode_error"] = f"{failed[0].key}: {failed[0]}"
        bad_keys = [e for e in self.errors.errors if e.reason == BAD_KEY]
        if bad_keys:
            first = bad_keys[0]  # repr: control characters and undecodable bytes stay visible, and storable
            out["first_bad_key"] = f"{first.key!r} in {first.url}: {first.detail}"
            log.warning("%d samples refused for their keys (cache/keys.py), first: %s", len(bad_keys),
                        out["first_bad_key"])
        atomic_write_json(self.dir / REPORT, out, indent=2)
        return out

    def _caption_variants(self) -> dict | None:
        """Encode the missing annotation captions (module docstring); the counts, or None when
        data.caption_sources does not use them."""
        from mmdit.producer.annotate.answers import annotation_caption

        if self.data.caption_weights()["annotation"] <= 0:
            return None
        cached = set(self.cache.keys(self.fp))
        rows = [r for r in read_manifest(self.dir / MANIFEST_DIR).to_pylist()
                if r["status"] == OK and r["task"] == "t2i" and r["key"] in cached]
        counts = Counter()
        todo: dict[str, str] = {}
        for r in rows:
            caption = annotation_caption(r)
            if r["key"] + ANNOTATION_CAPTION in cached:
                counts["cached"] += 1
            elif caption is not None:
                todo[r["key"]] = caption
            else:
                counts["annotation_failed" if r.get("annotation_status") else "not_annotated"] += 1
        keys = sorted(todo)
        for i in range(0, len(keys), self.data.encode_batch_size):
            found, _ = self.cache.read_available(keys[i:i + self.data.encode_batch_size], self.fp)
            originals = [found[k] for k in keys[i:i + self.data.encode_batch_size] if k in found]
            if originals:  # a damaged original is re-encoded by the next run, its caption then
                self.cache.write(self.encode.caption_variants(originals, [todo[o["key"]] for o in originals]))
                counts["encoded"] += len(originals)
        return {name: counts[name] for name in ("encoded", "cached", "annotation_failed", "not_annotated")}

    def _pass(self, urls: list[str], bar) -> None:
        data = self.data
        if not urls:
            return
        window: queue.Queue = queue.Queue(maxsize=max(4 * data.encode_batch_size, 2 * data.decode_workers))
        stop = threading.Event()
        pool = ThreadPoolExecutor(data.decode_workers, thread_name_prefix="decode")
        raws = tar_samples(urls, self.errors)
        reader = threading.Thread(
            target=_read_ahead, args=(raws, pool, self.ctx, self.known, window, stop), name="shard-reader", daemon=True
        )
        reader.start()
        try:
            while (fut := self._next(window)) is not None:
                if isinstance(fut, BaseException):
                    raise fut
                while not fut.done() and self.groups:  # decode is behind: encode a partial batch meanwhile
                    self._flush(self._fullest())
                bar.update(1)
                self._take(fut)
            for gkey in sorted(self.groups, key=str):  # the partial batches
                self._flush(gkey)
        finally:
            stop.set()
            _drain(window, reader)
            pool.shutdown(wait=True, cancel_futures=True)

    def _next(self, window: queue.Queue):
        """The next sample's future; while none is ready, the encoder works on what is batched
        (work-conserving: when decoding is the bottleneck, partial batches cost nothing)."""
        while True:
            try:
                return window.get_nowait()
            except queue.Empty:
                if not self.groups:
                    return window.get()
                self._flush(self._fullest())

    def _fullest(self) -> tuple:
        return max(self.groups, key=lambda g: len(self.groups[g]))

    def _take(self, fut: Future) -> None:
        """Count, describe, filter and batch one sample, in shard order."""
        report = self.report
        report.seen += 1
        try:
            item = fut.result()
        except SampleError as e:
            self.errors(e)
            self.manifest.add(error_row(e, self.data.base_resolution))
            return
        if not item.cached:
            item.row = carry_annotations(item.row, self.annotated.get(item.key))
            self.manifest.add(item.row)
            report.converted.update(item.converted)
        reason = item.reason
        if not reason and self.data.filters.drop_duplicates:
            if duplicates(np.array([item.row["phash"]], dtype=np.int64), np.array([True]), self.seen_phash)[0]:
                reason = "duplicate"
        if reason:
            report.rejected[reason] += 1
            return
        report.accepted += 1
        bucket = (item.row["bucket_h"], item.row["bucket_w"])
        report.buckets[f"{bucket[0]}x{bucket[1]}"] += 1
        report.tasks[item.row["task"]] += 1
        report.categories[item.row.get("category") or "unknown"] += 1
        if item.cached or self._is_cached(item.key):
            report.cache_hits += 1
            return
        src_bucket = tuple(item.src_pixels.shape[1:]) if item.src_pixels is not None else None
        gkey = (item.row["task"], bucket, src_bucket)
        self.groups[gkey].append(item)
        if len(self.groups[gkey]) >= self.data.encode_batch_size:
            self._flush(gkey)

    def _is_cached(self, key: str) -> bool:
        """Against a snapshot of the cache's keys, refreshed now and then to see other producers' work."""
        if time.monotonic() - self.last_scan > CACHE_RESCAN_S:
            self.cached.update(self.cache.keys(self.fp))
            self.last_scan = time.monotonic()
        return self._complete(key)

    def _flush(self, gkey: tuple) -> None:
        items = self.groups.pop(gkey)
        try:
            records = self.encode(items, gkey[1])
        except Exception as e:  # an encoder failure loses this batch only, counted per sample
            for it in items:
                self.errors(SampleError("encode_failed", f"{type(e).__name__}: {e}", it.key, it.row.get("url")))
            return
        self.writer.put(records)
        self.report.encoded += len(items)
        self.cached.update(r["key"] for r in records)

    def _finish_manifest(self) -> None:
        """Samples cut off by a broken shard are seen and described too; samples refused for
        their key (at the shard reader, before any decode) are seen, but not described."""
        for e in self.errors.errors:
            if e.reason in SHARD_ERRORS and e.key:
                self.report.seen += 1
                self.manifest.add(error_row(e, self.data.base_resolution))
            elif e.reason == BAD_KEY:
                self.report.seen += 1
        self.manifest.close()


def produce(data: DataConfig, cache_cfg: CacheConfig, encoders, progress: bool | None = None, batch_hook=None) -> dict:
    """Run the pipeline over `data.shards` into `cache_cfg.dir`; returns (and writes) report.json.

    `encoders` is a loaded `Encoders` (fingerprint, preprocess_image, encode_images,
    encode_prompts, encode_edit_prompts). `batch_hook(task, pixels, captions, src_pixels,
    src_images)` sees every encoded batch (the benchmark replays them). `progress`: a tqdm bar
    (default: when stderr is a terminal).
    """
    return CacheBuilder(data, cache_cfg, encoders, progress, batch_hook).run()


def _drain(window: queue.Queue, reader: threading.Thread) -> None:
    """Unblock and finish the reader thread after an early exit."""
    while reader.is_alive():
        try:
            window.get(timeout=0.05)
        except queue.Empty:
            pass


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: bool | None):
    """tqdm on a terminal (or when asked), nothing otherwise (logs stay clean)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="sample", desc="produce", dynamic_ncols=True)
