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

import json
import sys
from pathlib import Path

from mmdit.launch.args import Action, Command, Flag, parse

COMMAND = Command("cache", __doc__, actions=(Action(
    "verify", "read and check every record",
    paths={"CACHE_DIR": "the latent cache (a job's cache.dir)"},
    flags=(Flag("fingerprint", "only this encoder fingerprint", str, metavar="FP"),
           Flag("repair", "rewrite intact records, quarantine damaged files and strays")),
    overrides=None),))


def main(argv: list[str]) -> int:
    from mmdit.cache import LatentCache

    args = parse(COMMAND, argv)
    cache_dir, fingerprint, repair = args.paths[0], args.flags.fingerprint, args.flags.repair
    if not Path(cache_dir).is_dir():
        print(f"mmdit cache: {cache_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        report = LatentCache(cache_dir).verify(fingerprint, repair=repair)
    except ValueError as e:  # a --fingerprint that cannot name a directory
        print(f"mmdit cache: --fingerprint: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))  # ASCII: a file name that is not UTF-8 prints escaped
    if repair:
        left = report["unrepaired"]
        if left:
            print(f"mmdit cache: {len(left)} damaged entries could not be repaired (first: "
                  f"{next(iter(left))}: {next(iter(left.values()))})", file=sys.stderr)
        return 1 if left else 0
    return 1 if report["damaged_segments"] or report["damaged_records"] else 0
