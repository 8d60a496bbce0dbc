"""`mmdit produce`: score, filter, bucket and encode shards into the latent cache (producer/produce.py)."""

from __future__ import annotations

import json
import sys

from mmdit.producer.ingest import expand_shards
from mmdit.producer.produce import produce


def shards_override(argv: list[str]) -> list[str]:
    """Let `data.shards=PATTERN` be written bare: Hydra's grammar would read braces as a dict and
    commas as a sweep, and the field is a list, so values that are not list literals are quoted
    into one list; repeated bare `data.shards=` arguments (a shell-expanded glob or brace
    pattern) add up instead of overriding each other."""
    out, bare = [], []
    for arg in argv:
        if arg.startswith("data.shards=") and not arg.split("=", 1)[1].lstrip().startswith("["):
            bare.append(arg.split("=", 1)[1].replace("\\", "\\\\").replace("'", "\\'"))
        else:
            out.append(arg)
    if bare:
        out.append("data.shards=[" + ",".join(f"'{v}'" for v in bare) + "]")
    return out


def main(argv: list[str]) -> int:
    from mmdit.config.loader import load_config
    from mmdit.producer.encoders import Encoders, EncodersNotFoundError

    cfg = load_config(shards_override(argv))
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
