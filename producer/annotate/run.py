"""`mmdit annotate`: a VL model's annotation and an alignment score for every accepted sample.

    mmdit annotate cache.dir=cache data.shards='shards/*.tar' [annotate.model=DIR]
        [annotate.alignment_model=DIR] [annotate.batch_size=8] [annotate.max_new_tokens=256]
        [annotate.image_area=200704] [annotate.limit=N]

Which samples: the manifest rows `mmdit produce` accepted (status ok and passing data.filters
without the thresholds on annotations, duplicates dropped: `manifest.ingest_filters`, what
produce encodes) that are not annotated yet (annotation_status null) or not scored yet (alignment
null). Loosen data.filters on the command line to annotate more.

What it does: walks data.shards (only the shards holding pending samples), decodes those samples,
asks Qwen2.5-VL `annotation.PROMPT` about each image (greedy, batched, left padding; the image
resized to about annotate.image_area pixels), parses the answer (producer/annotate/answers.py), scores
the (image, caption) pair with the alignment model (producer/annotate/alignment.py), and writes a new
manifest row per sample: its current row plus the new columns. The annotation's category
replaces the row's when the trust order allows (`categories.overrides`); text_chars becomes the
larger of the row's and the visible text's length.

Resumable: rows are published after a batch (at most annotate.flush_seconds apart), and the
newest row per key wins, so a rerun does only what a killed run had not published. Answers that
fail to parse are work done (counted, the raw output stored), not redone.

Exit: 0 done (unparseable answers included), 2 a bad config (no manifest, no model), 1 a failure.
Report: <cache.dir>/annotate_report.json.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import torch
from PIL import Image

from mmdit.cache import ManifestWriter, ingest_filters, read_manifest, select_mask
from mmdit.cache.categories import FROM_ANNOTATION, overrides
from mmdit.config.data import DataConfig
from mmdit.config.produce import AnnotateConfig
from mmdit.producer.annotate.answers import OK, PROMPT, STATUSES, Parsed, parse
from mmdit.producer.ingest import ErrorLog, SampleError, decode_sample, expand_shards, sample_key, tar_samples
from mmdit.producer.prompts import IMAGE_PAD
from mmdit.utils.atomic import atomic_write_json

MANIFEST_DIR = "manifest"  # as produce.py
REPORT = "annotate_report.json"
VISION_MULTIPLE = 28
"""Qwen2.5-VL's patch (14) times its spatial merge (2): one vision token per 28x28 pixels."""

Generate = Callable[[list[Image.Image]], list[str]]
"""Images -> the VL model's answers (VLAnnotator, or a stand-in in tests)."""


class ModelNotFoundError(FileNotFoundError):
    """A model directory that is missing or not what the key needs; the message names the key."""


# ----------------------------------------------------------------------------- the VL model


def vl_size(img: Image.Image, area: int) -> tuple[int, int]:
    """(width, height) with about `area` pixels, the image's aspect, sides multiples of 28."""
    ratio = img.width / img.height
    width = math.sqrt(area * ratio)
    m = VISION_MULTIPLE
    return max(m, round(width / m) * m), max(m, round(width / ratio / m) * m)


def vl_paths(root: Path) -> tuple[Path, Path, Path]:
    """(model, tokenizer, image processor) folders of a Qwen-Image layout or of a plain
    Qwen2.5-VL-Instruct directory; ModelNotFoundError naming what is missing."""
    paths = (root / "text_encoder", root / "tokenizer", root / "processor")
    if not (root / "text_encoder" / "config.json").is_file():
        paths = (root, root, root)
    model, tokenizer, processor = paths
    missing = [str(p) for p in (model / "config.json", processor / "preprocessor_config.json") if not p.is_file()]
    if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / "vocab.json").is_file()):
        missing.append(str(tokenizer / "tokenizer.json"))
    if missing:
        raise ModelNotFoundError(f"annotate.model={str(root)!r} is not a Qwen-Image or Qwen2.5-VL directory, "
                                 f"missing: {', '.join(missing)}")
    kind = json.loads((model / "config.json").read_text()).get("model_type")
    if kind != "qwen2_5_vl":
        raise ModelNotFoundError(f"annotate.model={str(root)!r}: {model / 'config.json'} is a {kind!r} model, "
                                 "not qwen2_5_vl")
    return paths


class VLAnnotator:
    """Qwen2.5-VL answering `annotation.PROMPT` about images, greedily, one batch per call."""

    def __init__(self, model, tokenizer, image_processor, cfg: AnnotateConfig, name: str | None = None):
        from mmdit.producer.tiny_encoders import CHAT_TEMPLATE

        self.model, self.tokenizer, self.image_processor, self.cfg = model, tokenizer, image_processor, cfg
        self.name = name
        tokenizer.padding_side = "left"  # generation appends on the right
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        self.prompt = tokenizer.apply_chat_template(  # Qwen2-VL's template when the folder has none
            messages, chat_template=tokenizer.chat_template or CHAT_TEMPLATE, tokenize=False,
            add_generation_prompt=True,
        )
        if self.prompt.count(IMAGE_PAD) != 1:
            raise ValueError(f"the chat template puts {self.prompt.count(IMAGE_PAD)} {IMAGE_PAD} in a one-image prompt")

    @classmethod
    def load(cls, directory: str, cfg: AnnotateConfig, device: torch.device, dtype: torch.dtype) -> "VLAnnotator":
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from mmdit.producer.encoders import image_processor_class

        model_dir, tokenizer_dir, processor_dir = vl_paths(Path(directory))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
        model.to(device).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        return cls(model, tokenizer, image_processor_class().from_pretrained(processor_dir), cfg, directory)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        resized = [img.convert("RGB").resize(vl_size(img, self.cfg.image_area), Image.Resampling.BICUBIC)
                   for img in images]
        vision = self.image_processor(images=resized, return_tensors="pt")
        grid = vision["image_grid_thw"]  # [B, 3]: (t, h, w) patches
        merge = self.image_processor.merge_size
        texts = [self.prompt.replace(IMAGE_PAD, IMAGE_PAD * (int(g.prod()) // merge**2)) for g in grid]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        device = self.model.device
        out = self.model.generate(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
            pixel_values=vision["pixel_values"].to(device, self.model.dtype), image_grid_thw=grid.to(device),
            max_new_tokens=self.cfg.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
        )  # [B, L + new]
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------- the pipeline


def pending(table: pa.Table, data: DataConfig, annotating: bool, scoring: bool) -> dict[str, dict]:
    """Accepted rows (see the module docstring) still missing an annotation or a score, by key."""
    accepted, _ = select_mask(table, ingest_filters(data.filters))
    rows = table.filter(pa.array(accepted, type=pa.bool_())).to_pylist()
    return {r["key"]: r for r in rows
            if (annotating and r["annotation_status"] is None) or (scoring and r["alignment"] is None)}


def annotated_row(row: dict, parsed: Parsed) -> dict:
    """`row` with the annotation's columns; its category when the trust order allows."""
    row = {**row, **parsed.columns()}
    if parsed.status == OK:
        if overrides(row.get("category_source"), FROM_ANNOTATION):
            row["category"], row["category_source"] = parsed.value["category"], FROM_ANNOTATION
        row["text_chars"] = max(row.get("text_chars") or 0, len(parsed.value["text"]))
    return row


def shard_stem(url: str) -> str:
    return Path(url).name.split(".")[0]  # as sample_key names a shard


def find_samples(urls: list[str], todo: dict[str, dict], left: set[str], errors: ErrorLog,
                 max_pixels: int) -> Iterator[tuple[dict, dict]]:
    """(row, decoded sample) for every key of `left` found in `urls`, once each (removed from
    `left` as found); shards without such keys are not read."""
    stems = {key.split("/", 1)[0] for key in left}
    for raw in tar_samples([u for u in urls if shard_stem(u) in stems], errors):
        key = sample_key(raw)
        if key not in left:
            continue
        left.discard(key)
        try:
            yield todo[key], decode_sample(raw, max_pixels)
        except SampleError as e:  # it decoded when produce ran: the shard changed since
            errors(e)


def batches(items: Iterator, size: int, limit: int) -> Iterator[list]:
    """Lists of up to `size` items, at most `limit` items in all (0: no limit)."""
    batch: list = []
    for n, item in enumerate(items, 1):
        batch.append(item)
        if len(batch) == size or n == limit:
            yield batch
            batch = []
        if n == limit:
            return
    if batch:
        yield batch


class Report:
    """Counters of one run, written as annotate_report.json. `pending`: accepted samples missing
    an annotation or a score at the start; `done`: those handled; `not_found`: pending samples
    not in data.shards (null when annotate.limit stopped the walk; `left` counts what it left)."""

    def __init__(self, pending: int, model: str | None, alignment_model: str | None):
        self.pending, self.model, self.alignment_model = pending, model, alignment_model
        self.statuses: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.first_error: dict[str, str] = {}
        self.scored = self.done = 0
        self.start = time.perf_counter()

    def add(self, parsed: Parsed, key: str) -> None:
        self.statuses[parsed.status] += 1
        if parsed.status == OK:
            self.categories[parsed.value["category"]] += 1
        else:
            self.first_error.setdefault(parsed.status, f"{key}: {parsed.error}")

    def as_dict(self, errors: Counter, left: int, walked_all: bool) -> dict:
        seconds = time.perf_counter() - self.start
        return {
            "pending": self.pending, "done": self.done,
            "annotated": {s: self.statuses[s] for s in STATUSES}, "alignment_scored": self.scored,
            "not_found": left if walked_all else None, "left": left, "errors": dict(sorted(errors.items())),
            "categories": dict(sorted(self.categories.items())), "first_error": self.first_error,
            "model": self.model, "alignment_model": self.alignment_model, "seconds": round(seconds, 3),
            "samples_per_second": round(self.done / seconds, 3) if seconds > 0 else 0.0,
        }


def annotate(data: DataConfig, cache_dir: str, cfg: AnnotateConfig, vl: Generate | None = None,
             scorer=None, progress: bool | None = None) -> dict:
    """Annotate (`vl`) and score (`scorer`, an AlignmentScorer) the pending samples of the
    manifest in `cache_dir`; either may be None (skipped). Returns and writes the report."""
    from tqdm import tqdm

    manifest_dir = Path(cache_dir) / MANIFEST_DIR
    todo = pending(read_manifest(manifest_dir), data, vl is not None, scorer is not None)
    report = Report(len(todo), getattr(vl, "name", None), getattr(scorer, "name", None))
    errors, left = ErrorLog(), set(todo)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=min(len(todo), cfg.limit or len(todo)), desc="annotate", unit="sample", disable=not show)
    writer = ManifestWriter(manifest_dir, flush_rows=1 << 62)  # flushed below, by time
    last_flush = time.monotonic()
    found = find_samples(expand_shards(data.shards), todo, left, errors, data.max_image_pixels)
    try:
        for batch in batches(found, cfg.batch_size, cfg.limit):
            for row in annotate_batch(batch, vl, scorer, report):
                writer.add(row)
            report.done += len(batch)
            bar.update(len(batch))
            if time.monotonic() - last_flush >= cfg.flush_seconds:
                writer.flush()
                last_flush = time.monotonic()
    finally:
        found.close()
        writer.close()  # what is done is published, even when a batch failed
        bar.close()
    out = report.as_dict(errors.counts, len(left), walked_all=not cfg.limit or report.done < cfg.limit)
    atomic_write_json(Path(cache_dir) / REPORT, out, indent=2)
    return out


def annotate_batch(batch: list[tuple[dict, dict]], vl: Generate | None, scorer, report: Report) -> list[dict]:
    """New manifest rows for one batch of (row, sample)."""
    rows = [dict(row) for row, _ in batch]
    images = [sample["image"] for _, sample in batch]
    ask = [i for i, r in enumerate(rows) if vl is not None and r["annotation_status"] is None]
    if ask:
        for i, answer in zip(ask, vl([images[i] for i in ask]), strict=True):
            parsed = parse(answer)
            rows[i] = annotated_row(rows[i], parsed)
            report.add(parsed, rows[i]["key"])
    score = [i for i, r in enumerate(rows) if scorer is not None and r["alignment"] is None]
    if score:
        values = scorer.score([images[i] for i in score], [batch[i][1]["caption"] for i in score], len(score))
        for i, value in zip(score, values, strict=True):
            rows[i]["alignment"] = value
        report.scored += len(score)
    return rows


# ----------------------------------------------------------------------------- the command


def resolve_models(cfg) -> tuple[str | None, str | None]:
    """(VL model dir, alignment model dir) from annotate.* and encoders.dir; None: skipped."""
    a, enc_dir = cfg.annotate, cfg.encoders.dir
    model = None if a.model in ("none", "") else a.model
    if model == "auto":
        if not enc_dir:
            raise ModelNotFoundError("annotate.model: set annotate.model=DIR or encoders.dir=DIR (or annotate.model=none)")
        model = enc_dir
    align = None if a.alignment_model in ("none", "") else a.alignment_model
    if align == "auto":
        align = str(Path(enc_dir) / "alignment") if enc_dir and (Path(enc_dir) / "alignment").is_dir() else None
    elif align is not None and not (Path(align) / "config.json").is_file():
        raise ModelNotFoundError(f"annotate.alignment_model={align!r} has no config.json (a CLIP or SigLIP directory)")
    if model is None and align is None:
        raise ModelNotFoundError("annotate: nothing to do: annotate.model=none and no annotate.alignment_model")
    return model, align
