"""`mmdit cache verify CACHE_DIR [--fingerprint FP] [--repair]`: read every cached record back.

Prints a JSON report: segments and records read, damaged segments and records (file and key,
with the reason), what was quarantined. Exit 0 when the cache is intact (or was repaired), 1 when
damage is left. `--repair` rewrites each damaged segment's intact records and moves the damaged
file to `CACHE_DIR/quarantine/`; `mmdit produce` over the shards then re-encodes what was lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmdit cache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="read and check every record")
    verify.add_argument("cache_dir")
    verify.add_argument("--fingerprint", default=None, help="only this encoder fingerprint")
    verify.add_argument("--repair", action="store_true", help="rewrite intact records, quarantine damaged files")
    args = parser.parse_args(argv)
    from mmdit.producer.cache import LatentCache

    if not Path(args.cache_dir).is_dir():
        print(f"mmdit cache: {args.cache_dir} is not a directory", file=sys.stderr)
        return 2
    report = LatentCache(args.cache_dir).verify(args.fingerprint, repair=args.repair)
    print(json.dumps(report, indent=2))
    damaged = len(report["damaged_segments"]) + len(report["damaged_records"])
    return 0 if damaged == 0 or args.repair else 1
