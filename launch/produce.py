"""`mmdit produce`: score, filter, bucket and encode shards into the latent cache (producer/produce.py)."""

from __future__ import annotations

import json
import sys

from mmdit.launch.args import Action, Command, parse
from mmdit.producer.ingest import expand_shards
from mmdit.producer.produce import produce

COMMAND = Command("produce", __doc__, sections=("data", "cache", "encoders"), actions=(Action(
    help="data.shards=PATTERN may be repeated (a shell-expanded glob) and holds braces and globs as they are"),))


def main(argv: list[str]) -> int:
    from mmdit.config.loader import load_config
    from mmdit.producer.encoders import Encoders, EncodersNotFoundError

    cfg = load_config(parse(COMMAND, argv).overrides)
    if not cfg.encoders.dir:
        print("mmdit produce: set encoders.dir=DIR (a Qwen-Image-layout directory; `mmdit make-tiny-encoders DIR` writes a tiny one)", file=sys.stderr)
        return 2
    if not cfg.data.shards:
        print("mmdit produce: set data.shards=PATTERN (paths, globs or brace patterns of .tar shards)", file=sys.stderr)
        return 2
    if not expand_shards(cfg.data.shards):
        print(f"mmdit produce: data.shards={cfg.data.shards} matches no shard", file=sys.stderr)
        return 2
    try:
        encoders = Encoders.load(cfg.encoders)
    except EncodersNotFoundError as e:
        print(f"mmdit produce: {e}", file=sys.stderr)
        return 2
    report = produce(cfg.data, cfg.cache, encoders)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    failed = report["errors"].get("encode_failed", 0)
    if failed:
        print(f"mmdit produce: {failed} accepted samples could not be encoded (first: "
              f"{report['first_encode_error']}); the others are cached", file=sys.stderr)
        return 1
    return 0
