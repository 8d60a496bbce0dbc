"""What checkpoint checksums cost: save and verify time of a ~200 MB fake checkpoint, with and without.

Five safetensors files of random fp32 (a model shard and four optimizer shards, 40 MB each by
default) are published with `utils/atomic.py` (temp file, fsync, rename), ABAB over `--rounds`
rounds (ABBA): *plain*, and inside `recording_checksums()` (each file's CRC-32 taken from the temp file
just written). Verify compares the old structure check (safetensors headers and sizes), the
CRC-32 of every file (what resume adds) and reading every tensor (what resume then does anyway),
each with the files in the page cache (*hot*: right after a save) and evicted from it
(`posix_fadvise(DONTNEED)`: *cold*, read from the disk).

    python bench/checkpoint_checksum.py [--mb 40 --files 5 --rounds 9]  ->  bench/results/checkpoint_checksum.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmdit.utils.atomic import atomic_save_safetensors
from mmdit.utils.checksum import file_checksum, recording_checksums
from mmdit.utils.safetensors_header import data_end, read_header

RESULTS = Path(__file__).parent / "results"


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=40, help="size of each file")
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS / "checkpoint_checksum.json"))
    args = parser.parse_args(argv)
    started = time.time()
    g = torch.Generator().manual_seed(0)
    shards = [{f"t{j}": torch.randn(args.mb * (1 << 20) // 4 // 4, generator=g) for j in range(4)}
              for _ in range(args.files)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = [Path(tmp) / f"shard{i:02d}.safetensors" for i in range(args.files)]
        total = sum(p.numel() * 4 for s in shards for p in s.values())

        def save() -> None:
            for shard, path in zip(shards, paths):
                atomic_save_safetensors(shard, path)

        def save_recorded() -> None:
            with recording_checksums() as recorded:
                save()
            assert len(recorded) == len(paths)

        def structure() -> None:
            for path in paths:
                header, start, size = read_header(path)
                assert data_end(header, start) <= size

        def checksums() -> None:
            for path in paths:
                file_checksum(path)

        def load() -> None:  # load_file maps the file: the copies read it
            for path in paths:
                for t in load_file(path).values():
                    t.clone()

        times: dict[str, list[float]] = {}
        for r in range(args.rounds):  # ABBA: drift in the machine's load hits both
            order = (("save_plain", save), ("save_with_checksums", save_recorded))
            for name, fn in order if r % 2 == 0 else order[::-1]:
                times.setdefault(name, []).append(timed(fn))
            for name, fn in (("structure", structure), ("checksums", checksums), ("load", load)):
                times.setdefault(f"verify_{name}_hot", []).append(timed(fn))
                evict(paths)
                times.setdefault(f"verify_{name}_cold", []).append(timed(fn))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    results = {
        "bytes": total, "files": args.files, "rounds": args.rounds,
        "median_s": median,
        "save_ratio_with_over_plain": median["save_with_checksums"] / median["save_plain"],
        # the same from the parts, steadier on a loaded machine: the added work is one hot CRC pass
        "save_ratio_from_parts": (median["save_plain"] + median["verify_checksums_hot"]) / median["save_plain"],
        "checksum_gb_per_s_hot": total / median["verify_checksums_hot"] / 1e9,
        "checksum_gb_per_s_cold": total / median["verify_checksums_cold"] / 1e9,
        "verify_ratio_checksums_over_load_hot": median["verify_checksums_hot"] / median["verify_load_hot"],
        "verify_ratio_checksums_over_load_cold": median["verify_checksums_cold"] / median["verify_load_cold"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "wall_s": time.time() - started,
        "reproduce": "python bench/checkpoint_checksum.py " + " ".join(argv),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
