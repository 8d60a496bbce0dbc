"""Data-service benchmark: `python bench/data_service.py` -> bench/results/data_service.json.

Four measurements, each with real processes on this machine (`mmdit serve`, `mmdit consume`,
TensorPipe RPC over loopback):

(a) data_wait_fraction: one consumer with a simulated 200 ms step, 2 producers serving ~7 MB
    batches (4 x [16,64,64] fp32 latents + 4 x [<=256, 3584] bf16 prompt embeddings) from the
    cache; the consumer starts once both producers have joined (as a trainer, which builds its
    model first, would). Target <= 0.01.
(b) fetch throughput of our path (ServiceClient: locate at the coordinator, fetch the shard from
    the producer, ack; `service.prefetch` in flight) relative to raw TensorPipe `rpc_sync` of the
    very same prepared tensors from the same producers, same run. Producers prepare every batch
    first (their next ones are held back by a long simulated encode), so both paths move
    prepared tensors only. Target >= 0.7.
(c) throughput with 1 and with 3 producers when each is limited by a simulated per-batch encode
    latency (not by this machine's cores): the ratio. Target >= 2.5.
(d) coordinator capacity: 16 light producer processes that lease a batch and ack it (one
    lease + one ack RPC per operation, no tensors), against `mmdit serve service.producers=0`.
    Target >= 1000 operations/s (a 1,000-GPU job at TP=8 needs about 60/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_results  # bench/ is a scripts folder: run as `python bench/data_service.py`

from mmdit.utils.processes import ServeProcess, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "data_service.json"
FP = "fp_bench"


# ----------------------------------------------------------------------------- caches


def write_cache(path: Path, n: int, bucket: tuple[int, int], tokens: tuple[int, int], dim: int,
                embed_dtype=torch.bfloat16) -> None:
    from mmdit.cache import LatentCache

    g = torch.Generator().manual_seed(0)
    cache = LatentCache(path)
    records = []
    for i in range(n):
        length = int(torch.randint(tokens[0], tokens[1] + 1, (1,), generator=g))
        records.append({"key": f"b{i:05d}", "fingerprint": FP, "bucket": bucket, "task": "t2i",
                        "caption": f"caption {i}", "source": "bench",
                        "latents": torch.randn(16, bucket[0] // 8, bucket[1] // 8, generator=g),
                        "prompt_embeds": torch.randn(length, dim, generator=g).to(embed_dtype)})
        if len(records) == 64:
            cache.write(records)
            records = []
    if records:
        cache.write(records)


# ----------------------------------------------------------------------------- processes


def overrides(cache: Path, run: Path, port: int, **extra) -> list[str]:
    if run.exists():
        shutil.rmtree(run)  # a fresh run: no stale service.json, no consumer state to resume
    base = {"cache.dir": str(cache), "run.dir": str(run), "service.port": port, "service.dp_size": 1,
            "checkpoint.resume": "false",
            "launch.master_port": free_port(), "service.join_timeout_s": 120, "service.rpc_timeout_s": 120,
            "service.consumer_timeout_s": 120}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def consume(args: list[str], run: Path, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "consume", *args, f"train.steps={steps}"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"mmdit consume failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run / "consume-dp0-tp0.json").read_text())
    assert summary["steps"] == steps, summary
    return summary


def wait_for_status(run: Path, predicate, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = json.loads((run / "service.json").read_text())
            if predicate(status):
                return status
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise TimeoutError("the service did not reach the expected state")


# ----------------------------------------------------------------------------- (a) data wait


def bench_data_wait(cache: Path, tmp: Path, steps: int) -> dict:
    run = tmp / "wait"
    args = overrides(cache, run, free_port(), **{"service.producers": 2, "train.micro_batch_size": 4})
    serve = ServeProcess(args)
    try:  # like a trainer that starts after the service is up: producers have joined and leased
        wait_for_status(run, lambda s: sum(p["alive"] and p["held"] > 0 for p in s["producers"].values()) == 2)
        summary = consume(args + ["service.step_time_s=0.2"], run, steps)
    finally:
        serve.stop()
    return {"data_wait_fraction": summary["data_wait_fraction"],
            "data_wait_fraction_after_first_step": summary["data_wait_fraction_after_first"],
            "first_wait_s": summary["first_wait_s"], "wait_max_s": summary["wait_max_s"],
            "wait_mean_s": summary["wait_mean_s"], "steps": steps, "step_time_s": 0.2, "producers": 2,
            "target": "<= 0.01", "passed": summary["data_wait_fraction"] <= 0.01}


# ----------------------------------------------------------------------------- (b) fetch path


def _fetch_worker(cache: Path, tmp: Path, producers: int, depth: int, rounds: int) -> dict:
    """Runs in its own process (an RPC group can be joined once per process).

    Every batch is prepared before measuring (producers then hold their next ones back with a
    long simulated encode), so both paths move prepared tensors. In each round, the raw path
    `rpc_sync`s the round's batches from their producers (twice), then the client consumes the
    same batches; the client's rate counts only steady state (after the batches it prefetched
    while the raw path ran, which it got for free).
    """
    from mmdit.config.service import ClientSettings, ServiceConfig
    from mmdit.dataservice import protocol, rpc
    from mmdit.dataservice.client import ServiceClient

    run = tmp / "fetch"
    port = free_port()
    n = producers * depth
    per_round = n // rounds
    extra = {"service.producers": producers, "service.prepare_depth": depth, "service.prepare_workers": depth,
             "service.simulate_encode_s": 10, "service.plan_ahead": 4 * n, "train.micro_batch_size": 4}
    serve = ServeProcess(overrides(cache, run, port, **extra))
    try:
        svc = ServiceConfig(port=port, rpc_timeout_s=120, join_timeout_s=120)
        name = rpc.incarnation_name("bench")
        rpc.join(name, svc.host, port, rpc_timeout_s=120)
        wait_for_status(run, lambda s: sum(p["held"] for p in s["producers"].values()) >= n)
        gen = rpc.call(rpc.COORDINATOR, protocol.status, timeout_s=60)["gen"]
        where = [rpc.call(rpc.COORDINATOR, protocol.locate, name, gen, seq, timeout_s=60) for seq in range(n)]
        assert all(w.status == "ok" for w in where), where
        keys, nbytes = [], 0
        deadline = time.monotonic() + 120
        for w in where:  # wait until all are prepared (one simulated encode), warming every pipe
            while (b := rpc.call(w.owner, protocol.peek, w.uid, 0, timeout_s=60)) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"batch {w.uid} not prepared")
                time.sleep(0.5)
            nbytes += sum(t.numel() * t.element_size() for t in b.values() if isinstance(t, torch.Tensor))
            keys.append(b["keys"])
        client, got, raw_rates, our_rates = None, [], [], []
        for r in range(rounds):
            mine = where[r * per_round:(r + 1) * per_round]
            time.sleep(0.3)  # let the client's background prefetch finish: the raw path runs alone
            started = time.perf_counter()
            for _ in range(2):
                for w in mine:
                    torch.distributed.rpc.rpc_sync(w.owner, protocol.peek, args=(w.uid, 0), timeout=60)
            raw_rates.append(2 * len(mine) / (time.perf_counter() - started))
            if client is None:
                client = ServiceClient(svc.role(ClientSettings), 0, 1, 4)
            free = min(svc.prefetch, len(client._futures))
            for i in range(per_round):
                if i == free:
                    started = time.perf_counter()
                got.append(next(client)["keys"])  # like a trainer: use the batch, let it go
            our_rates.append((per_round - free) / (time.perf_counter() - started))
        assert got == keys[:len(got)]  # the same batches, in plan order
        client.close()
        rpc.leave(graceful=True)
    finally:
        serve.stop()
    ratios = [o / r for o, r in zip(our_rates, raw_rates)]
    mb = nbytes / n / 2**20
    ratio = statistics.median(ratios)
    return {"batch_mb": mb, "rounds": rounds, "batches_per_round": per_round,
            "raw_rpc_sync_batches_per_s": raw_rates, "ours_batches_per_s": our_rates, "ratios": ratios,
            "ratio": ratio, "ours_gb_per_s_median": statistics.median(our_rates) * mb * 2**20 / 1e9,
            "raw_gb_per_s_median": statistics.median(raw_rates) * mb * 2**20 / 1e9, "prefetch": svc.prefetch,
            "fetch_threads": svc.fetch_threads, "target": ">= 0.7", "passed": ratio >= 0.7}


# ----------------------------------------------------------------------------- (c) scaling


def bench_scaling(cache: Path, tmp: Path, latency_s: float, steps: int, warmup: int) -> dict:
    """Steady-state rate: the first `warmup` steps are excluded, which covers the batches the
    producers prepared before the consumer started (producers x depth 2, plus the prefetch)."""
    rates = {}
    for producers in (1, 3):
        run = tmp / f"scale{producers}"
        args = overrides(cache, run, free_port(), **{"service.producers": producers, "service.prepare_depth": 2,
                                                     "service.simulate_encode_s": latency_s,
                                                     "train.micro_batch_size": 4})
        serve = ServeProcess(args)
        try:
            summary = consume(args + ["service.step_time_s=0"], run, steps)
        finally:
            serve.stop()
        times = summary["step_times_s"][warmup:]
        rates[producers] = len(times) / sum(times)
    return {"encode_latency_s": latency_s, "batches_per_s_1_producer": rates[1],
            "batches_per_s_3_producers": rates[3], "speedup": rates[3] / rates[1], "steps": steps,
            "warmup_steps_excluded": warmup, "target": ">= 2.5", "passed": rates[3] / rates[1] >= 2.5}


# ----------------------------------------------------------------------------- (d) coordinator


def _light_worker(port: int, go: str, seconds: float, out: str) -> None:
    """A light producer: lease one batch, ack it, repeat, for `seconds` from the time in `go`.

    It joins, writes `<out>.ready`, and waits for the orchestrator to write `go` (a start time
    shortly after every light producer is ready), so all of them count over the same window.
    """
    from mmdit.dataservice import protocol, rpc

    torch.set_num_threads(1)
    name = rpc.incarnation_name("producer")
    rank = rpc.join(name, "127.0.0.1", port, rpc_timeout_s=120, join_timeout_s=180, num_worker_threads=4)
    Path(out + ".ready").touch()
    while not Path(go).exists():
        time.sleep(0.05)
    start_at = float(Path(go).read_text())
    while time.time() < start_at:
        time.sleep(0.005)
    ops, latencies = 0, []
    end = start_at + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        reply = rpc.call(rpc.COORDINATOR, protocol.lease, name, rank, 1, [], timeout_s=60)
        for seq, _ in reply.new:
            rpc.call(rpc.COORDINATOR, protocol.ack, "bench_trainer", 0, reply.gen, [seq], timeout_s=60)
            ops += 1
        latencies.append(time.perf_counter() - t0)
    rpc.call(rpc.COORDINATOR, protocol.producer_left, name, timeout_s=60)
    Path(out).write_text(json.dumps({"ops": ops, "median_op_ms": 1e3 * statistics.median(latencies)}))
    rpc.leave(graceful=True)


def bench_coordinator(cache: Path, tmp: Path, processes: int, seconds: float) -> dict:
    run = tmp / "coord"
    port = free_port()
    serve = ServeProcess(overrides(cache, run, port, **{"service.producers": 0, "service.plan_ahead": 256,
                                                  "train.micro_batch_size": 1}))
    go = tmp / "light.go"
    try:
        outs = [tmp / f"light{i}.json" for i in range(processes)]
        procs = [subprocess.Popen([sys.executable, __file__, "--part", "light", "--port", str(port),
                                   "--go", str(go), "--seconds", str(seconds), "--out", str(o)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for o in outs]
        deadline = time.monotonic() + 300
        while not all(Path(f"{o}.ready").exists() for o in outs):
            if time.monotonic() > deadline or any(p.poll() for p in procs):
                raise RuntimeError("light producers did not all join")
            time.sleep(0.2)
        go.write_text(str(time.time() + 1.0))
        for p in procs:
            p.wait(timeout=seconds + 120)
        results = [json.loads(o.read_text()) for o in outs if o.exists()]
        if len(results) != processes:
            raise RuntimeError(f"only {len(results)} of {processes} light producers reported")
        status = json.loads((run / "service.json").read_text())
    finally:
        serve.stop()
    ops = sum(r["ops"] for r in results)
    return {"producer_processes": processes, "seconds": seconds, "lease_ack_ops_per_s": ops / seconds,
            "rpcs_per_op": 2, "median_lease_plus_ack_ms": statistics.median(r["median_op_ms"] for r in results),
            "coordinator_batches_done": status["counters"]["batches_done"], "target": ">= 1000",
            "passed": ops / seconds >= 1000}


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["all", "fetch", "light"])
    parser.add_argument("--cache", help="(internal) cache dir of --part fetch")
    parser.add_argument("--tmp", help="(internal) scratch dir of --part fetch")
    parser.add_argument("--out", help="(internal) result file of --part light")
    parser.add_argument("--port", type=int, help="(internal) coordinator port of --part light")
    parser.add_argument("--go", help="(internal) start-time file of --part light")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--light-processes", type=int, default=16)
    args = parser.parse_args()
    if args.part == "light":
        _light_worker(args.port, args.go, args.seconds, args.out)
        return 0
    if args.part == "fetch":
        print(json.dumps(_fetch_worker(Path(args.cache), Path(args.tmp), producers=2, depth=24, rounds=3)))
        return 0
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="mmdit-bench-") as tmp:
        tmp = Path(tmp)
        big, small = tmp / "cache_big", tmp / "cache_small"
        write_cache(big, 64, (512, 512), (64, 256), 3584)
        write_cache(small, 256, (256, 256), (8, 32), 64)
        results = {"data_wait": bench_data_wait(big, tmp, steps=40)}
        print(json.dumps(results["data_wait"]), flush=True)
        fetch = subprocess.run([sys.executable, __file__, "--part", "fetch", "--cache", str(big), "--tmp", str(tmp)],
                               capture_output=True, text=True, timeout=600)
        if fetch.returncode:
            raise RuntimeError(f"fetch benchmark failed:\n{fetch.stderr[-3000:]}")
        results["fetch"] = json.loads(fetch.stdout.strip().splitlines()[-1])
        print(json.dumps(results["fetch"]), flush=True)
        results["scaling"] = bench_scaling(small, tmp, latency_s=0.25, steps=52, warmup=12)
        print(json.dumps(results["scaling"]), flush=True)
        results["coordinator"] = bench_coordinator(small, tmp, args.light_processes, args.seconds)
        print(json.dumps(results["coordinator"]), flush=True)
    write_results(results, RESULTS, started, "python bench/data_service.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
