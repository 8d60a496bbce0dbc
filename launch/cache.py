"""`mmdit cache verify CACHE_DIR [--fingerprint FP] [--repair]`: read every cached record back.

Prints a JSON report: segments and records read, stray entries (anything in a bucket directory
that is not a segment: other files, FIFOs, sockets, devices, directories, symlinks, none of them
ever opened), damaged segments and records (file and key, with the reason), what was
quarantined, and what a repair could not fix. Exit 0 when the cache is intact, or when `--repair`
fixed everything it found (a plain verify then exits 0 too); 1 when damage is left. `--repair`
rewrites each damaged segment's intact records and moves the damaged file and every stray entry
to `CACHE_DIR/quarantine/`; `mmdit produce` over the shards then re-encodes what was lost.
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
    from mmdit.cache import LatentCache

    if not Path(args.cache_dir).is_dir():
        print(f"mmdit cache: {args.cache_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        report = LatentCache(args.cache_dir).verify(args.fingerprint, repair=args.repair)
    except ValueError as e:  # a --fingerprint that cannot name a directory
        print(f"mmdit cache: --fingerprint: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))  # ASCII: a file name that is not UTF-8 prints escaped
    if args.repair:
        left = report["unrepaired"]
        if left:
            print(f"mmdit cache: {len(left)} damaged entries could not be repaired (first: "
                  f"{next(iter(left))}: {next(iter(left.values()))})", file=sys.stderr)
        return 1 if left else 0
    return 1 if report["damaged_segments"] or report["damaged_records"] else 0
