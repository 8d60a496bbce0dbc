"""Prompt features in bf16 (cache.feature_dtype's default) against fp32: `python bench/feature_dtype.py`
-> bench/results/feature_dtype.json.

Records at Qwen-Image shapes (1024 prompt tokens x 3584 features; latents of a 1328x1328 image,
16 x 166 x 166 fp32, which stay fp32), one cache per dtype, same random values. Side by side in
one run, both dtypes timed round-robin (after two warm-up rounds) and the median of `--rounds`
kept:

- bytes per record on disk (segment files over records) and of the prompt features alone;
- cache read: `LatentCache.read_available` of one batch and the producer's `collate` (what a
  producer does to prepare a batch), warm page cache, in this process;
- fetch: a second process (a trainer's stand-in) asks this one over TensorPipe RPC for a batch,
  which is read from the cache, collated and sent, as a producer serves it (`rpc_sync` round
  trip, loopback).

The ratios bf16 / fp32 are the figures. The features alone halve exactly, a record by less (its
latents do not change). Times follow the bytes, and on this 2-core machine fell further: a
batch's fresh buffers are faulted in page by page (a 59 MB fp32 batch about 14,000 minor
faults, a bf16 one about 5,000).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_results  # bench/ is a scripts folder: run as `python bench/feature_dtype.py`

RESULTS = Path(__file__).resolve().parent / "results" / "feature_dtype.json"
FP = "fp_dtype_bench"
BUCKET = (1328, 1328)
TOKENS, WIDTH = 1024, 3584
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SERVER = "feature_server"
WARMUP_ROUNDS = 2
"""Rounds run first and not counted: the first transfers and large allocations of a process
(pipes, page faults of fresh buffers) are slower, and would favour the dtype timed later."""

_caches: dict = {}  # dtype name -> (LatentCache, batches of keys): what the served calls read


def write_caches(root: Path, records: int) -> dict[str, dict]:
    """One cache per dtype, the same values (the bf16 one rounded); bytes on disk per record."""
    from mmdit.cache import LatentCache

    sizes = {}
    for name, dtype in DTYPES.items():
        g = torch.Generator().manual_seed(0)
        cache = LatentCache(root / name)
        for i in range(records):  # one record per write: memory stays one record
            cache.write([{"key": f"k{i:04d}", "fingerprint": FP, "bucket": BUCKET, "task": "t2i",
                          "caption": f"caption {i}", "source": "bench",
                          "latents": torch.randn(16, BUCKET[0] // 8, BUCKET[1] // 8, generator=g),
                          "prompt_embeds": torch.randn(TOKENS, WIDTH, generator=g).to(dtype)}])
        files = sum(Path(p).stat().st_size for p in cache.segment_paths(FP))
        sizes[name] = {"record_bytes": files / records, "feature_bytes": TOKENS * WIDTH * dtype.itemsize,
                       "latent_bytes": 16 * (BUCKET[0] // 8) * (BUCKET[1] // 8) * 4}
        cache.close()
    return sizes


def open_caches(root: Path, batch: int) -> None:
    from mmdit.cache import LatentCache

    for name in DTYPES:
        cache = LatentCache(root / name)
        keys = sorted(cache.keys(FP))
        _caches[name] = (cache, [keys[i:i + batch] for i in range(0, len(keys) - batch + 1, batch)])


def prepare(name: str, index: int) -> dict:
    """A producer's work for one batch: read its records, collate them (the served RPC too)."""
    from mmdit.dataservice.plan import PlannedBatch
    from mmdit.dataservice.server import collate

    cache, batches = _caches[name]
    keys = batches[index % len(batches)]
    found, problems = cache.read_available(keys, FP)
    assert not problems, problems
    planned = PlannedBatch(0, index, BUCKET, "t2i", None, tuple(keys), 0)
    return collate([found[k] for k in keys], planned, seq=index, gen=0, producer=SERVER)


def time_reads(rounds: int, per_round: int) -> dict[str, list[float]]:
    seconds = {name: [] for name in DTYPES}
    for r in range(-WARMUP_ROUNDS, rounds):
        for name in DTYPES:  # round-robin: drift of a shared machine favours neither
            t0 = time.perf_counter()
            for i in range(per_round):
                batch = prepare(name, r * per_round + i)
            if r >= 0:
                seconds[name].append((time.perf_counter() - t0) / per_round)
            assert batch["prompt_embeds"].dtype == DTYPES[name]
    return seconds


def fetcher(port: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    """The trainer's side (its own process): fetch batches from the server, round-robin."""
    import torch.distributed.rpc as torch_rpc

    from mmdit.dataservice import rpc

    torch.set_num_threads(1)
    rpc.join(rpc.incarnation_name("fetcher"), "127.0.0.1", port, rpc_timeout_s=300, num_worker_threads=4)
    seconds = {name: [] for name in DTYPES}
    for r in range(-WARMUP_ROUNDS, rounds):
        for name in DTYPES:
            t0 = time.perf_counter()
            for i in range(per_round):
                batch = torch_rpc.rpc_sync(SERVER, prepare, args=(name, r * per_round + i), timeout=300)
            if r >= 0:
                seconds[name].append((time.perf_counter() - t0) / per_round)
            assert batch["prompt_embeds"].dtype == DTYPES[name]
    rpc.leave(graceful=True)
    return seconds


def time_fetches(rounds: int, per_round: int) -> dict[str, list[float]]:
    """Host the RPC group (any free port), serve `prepare`, and run the fetcher process."""
    from mmdit.dataservice import rpc

    rpc.join(SERVER, "127.0.0.1", 0, rank=0, rpc_timeout_s=300, num_worker_threads=4)
    try:
        done = subprocess.run([sys.executable, __file__, "--part", "fetch", "--port", str(rpc.hosted_port()),
                               "--rounds", str(rounds), "--per-round", str(per_round)],
                              capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"the fetcher failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        rpc.leave(graceful=False)


def summary(seconds: dict[str, list[float]], batch_bytes: dict[str, float]) -> dict:
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {"seconds_per_batch_median": median, "seconds_per_batch_rounds": seconds,
            "gb_per_s": {name: batch_bytes[name] / median[name] / 1e9 for name in DTYPES},
            "bf16_over_fp32": median["bf16"] / median["fp32"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["all", "fetch"])
    parser.add_argument("--port", type=int, help="(internal) the server's port, for --part fetch")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="records per batch (one DP shard)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--per-round", type=int, default=4)
    args = parser.parse_args()
    if args.part == "fetch":
        print(json.dumps(fetcher(args.port, args.rounds, args.per_round)))
        return 0
    started = time.time()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mmdit-bench-") as tmp:
        sizes = write_caches(Path(tmp), args.records)
        open_caches(Path(tmp), args.batch)
        batch_bytes = {name: args.batch * (s["feature_bytes"] + s["latent_bytes"]) for name, s in sizes.items()}
        read = summary(time_reads(args.rounds, args.per_round), batch_bytes)
        print(json.dumps({"read": read["bf16_over_fp32"]}), flush=True)
        fetch = summary(time_fetches(args.rounds, args.per_round), batch_bytes)
        print(json.dumps({"fetch": fetch["bf16_over_fp32"]}), flush=True)
        for cache, _ in _caches.values():
            cache.close()
    results = {
        "shapes": {"prompt_tokens": TOKENS, "feature_width": WIDTH, "bucket": list(BUCKET), "batch": args.batch,
                   "records_per_cache": args.records},
        "bytes": sizes,
        "record_bytes_bf16_over_fp32": sizes["bf16"]["record_bytes"] / sizes["fp32"]["record_bytes"],
        "feature_bytes_bf16_over_fp32": sizes["bf16"]["feature_bytes"] / sizes["fp32"]["feature_bytes"],
        "cache_read": read,
        "fetch": fetch,
        "note": "warm page cache and loopback RPC: software and memory-bandwidth costs; a cold read from disk or a "
                "network transfer scales with the bytes",
    }
    write_results(results, RESULTS, started, "python bench/feature_dtype.py")
    print(json.dumps({k: results[k] for k in ("record_bytes_bf16_over_fp32", "feature_bytes_bf16_over_fp32")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
