"""`mmdit annotate`: VL annotations and alignment scores into the manifest (producer/annotate/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmdit.cache import read_manifest
from mmdit.launch.args import Action, Command, parse
from mmdit.producer.annotate.run import MANIFEST_DIR, ModelNotFoundError, VLAnnotator, annotate, resolve_models
from mmdit.producer.ingest import expand_shards

COMMAND = Command("annotate", __doc__, sections=("data", "cache", "encoders", "annotate"), actions=(Action(
    help="data.shards=PATTERN: the shards `mmdit produce` read (bare globs and braces, repeatable)"),))


def main(argv: list[str]) -> int:
    from mmdit.config.loader import load_config
    from mmdit.producer.annotate.alignment import AlignmentScorer
    from mmdit.producer.encoders import resolve_device

    cfg = load_config(parse(COMMAND, argv).overrides)
    if not read_manifest(Path(cfg.cache.dir) / MANIFEST_DIR).num_rows:
        print(f"mmdit annotate: cache.dir={cfg.cache.dir} has no manifest (run `mmdit produce` first)", file=sys.stderr)
        return 2
    if not expand_shards(cfg.data.shards):
        print(f"mmdit annotate: data.shards={cfg.data.shards} matches no shard (the shards produce read)", file=sys.stderr)
        return 2
    device, dtype = resolve_device(cfg.encoders)
    try:
        model, align = resolve_models(cfg)
        vl = VLAnnotator.load(model, cfg.annotate, device, dtype) if model else None
    except ModelNotFoundError as e:
        print(f"mmdit annotate: {e}", file=sys.stderr)
        return 2
    scorer = AlignmentScorer.load(align, device, dtype) if align else None
    report = annotate(cfg.data, cfg.cache.dir, cfg.annotate, vl, scorer)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0
