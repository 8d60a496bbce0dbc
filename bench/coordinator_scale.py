"""Coordinator scale benchmark: `python bench/coordinator_scale.py` -> bench/results/coordinator_scale.json.

One real coordinator (`mmdit serve service.producers=0`, TensorPipe over loopback) serves a
64-rank data-parallel job (512 GPUs at TP=8) while 64, then 256, producers lease from it. The
producers and the DP-rank clients are threads in a few worker processes, each under its own RPC
name, calling the coordinator exactly as dataservice/server.py and client.py do: producers
long-poll `lease` with what they hold and keep what the reply keeps (preparing takes no time
here), clients `locate` each batch in order and `ack` it. Nothing is fetched, so the coordinator
and the RPC layer are the only work: what is measured is how many global batches per second one
coordinator hands out and retires, and the latency of each call (a `lease` is a long poll: it
returns at once with new work, otherwise after one heartbeat), against what a run needs
(`mmdit capacity`: about 3.9 global batches per second for 512 GPUs at 256 px, 0.19 at 1328).

Absolute figures are this machine's (its cores are shared by the coordinator and every worker);
the ratio to the requirement is the point.

`--protocol windowed --dp 512 --producers 1024 --rate R` runs the protocol of dataservice/client.py
instead, paced like a job: every DP rank consumes one global batch (2048 samples) every 1/R
seconds, `locate`s a window of `LOCATE_WINDOW` batches in one call that carries its acks, and sends
acks alone only once they waited the `ack_hold_s` the coordinator allows. What is measured then is
whether one coordinator keeps up with R global batches per second and the latency of its calls
(bench/coordinator_model.py measures its CPU per batch in process; docs/capacity.md combines them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from data_service import overrides, wait_for_status, write_cache  # noqa: E402

from mmdit.utils.processes import (
    ServeProcess,  # noqa: E402
    free_port,  # noqa: E402
)

RESULTS = Path(__file__).resolve().parent / "results" / "coordinator_scale.json"
DP, MICRO_BATCH, DEPTH = 64, 1, 4
NEEDED_BATCHES_PER_S = {"256": 3.91, "1328": 0.19}  # `mmdit capacity`, 512 trainer GPUs, global batch 2048
GLOBAL_BATCH = 2048
SAMPLES_PER_S_PER_GPU = {"256": 15.64, "640": 3.87, "1328": 0.75}  # `mmdit capacity` (20B, MFU 0.40)


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": 1e3 * xs[len(xs) // 2], "p99_ms": 1e3 * xs[min(len(xs) - 1, int(0.99 * len(xs)))]}


# ----------------------------------------------------------------------------- worker process


def worker(port: int, producers: list[int], dp_ranks: list[int], go: Path, seconds: float, out: Path,
           dp: int = DP, micro_batch: int = MICRO_BATCH, protocol_name: str = "per_batch", rate: float = 0.0) -> None:
    """Producer and client threads of one worker process, counting over the same window."""
    from mmdit.dataservice import protocol, rpc

    torch.set_num_threads(1)
    me = rpc.incarnation_name("bench")
    rpc.join(me, "127.0.0.1", port, rpc_timeout_s=120, join_timeout_s=300, num_worker_threads=4)
    out.with_suffix(".ready").touch()
    while not go.exists():
        time.sleep(0.05)
    start_at = float(go.read_text())
    end_at = start_at + seconds
    lock = threading.Lock()
    lat = {"lease": [], "locate": [], "ack": []}
    counts = {"lease": 0, "lease_granting": 0, "locate": 0, "ack": 0, "batches": 0}

    def timed(kind: str, fn, *args):
        t0 = time.perf_counter()
        reply = rpc.call(rpc.COORDINATOR, fn, *args, timeout_s=120)
        if time.time() >= start_at:
            with lock:
                lat[kind].append(time.perf_counter() - t0)
                counts[kind] += 1
        return reply

    def producer(i: int) -> None:
        name, held = f"producer_bench_{i}", set()
        while time.time() < end_at:
            reply = timed("lease", protocol.lease, name, 1000 + i, DEPTH, sorted(held))
            if reply.new and time.time() >= start_at:
                with lock:
                    counts["lease_granting"] += 1
            keep = {(reply.gen, s) for s in reply.keep}
            held = (held | {(reply.gen, s) for s, _ in reply.new}) & keep
        rpc.call(rpc.COORDINATOR, protocol.producer_left, name, timeout_s=120)

    def client(dp_rank: int) -> None:
        name = f"trainer_bench_{dp_rank}"
        reg = rpc.call(rpc.COORDINATOR, protocol.register_consumer, name, 5000 + dp_rank, dp_rank, dp, micro_batch,
                       None, None, timeout_s=120)
        gen, seq = reg.gen, reg.cursor["seq"]
        if protocol_name == "windowed":
            paced(name, dp_rank, gen, seq)
            return
        while time.time() < end_at:
            where = timed("locate", protocol.locate, name, gen, seq, 0)
            if where.status != "ok":  # waiting: not leased within a heartbeat
                continue
            timed("ack", protocol.ack, name, dp_rank, gen, [seq], None)
            if time.time() >= start_at:
                with lock:
                    counts["batches"] += 1
            seq += 1

    def paced(name: str, dp_rank: int, gen: int, seq: int) -> None:
        """The windowed client at `rate` global batches per second (dataservice/client.py's calls)."""
        from mmdit.dataservice.client import LOCATE_WINDOW

        located: set[int] = set()
        acks: list[int] = []
        acks_since, hold = 0.0, 0.0
        first = time.time()
        while time.time() < end_at:
            if seq not in located:
                where = timed("locate", protocol.locate, name, gen, seq, LOCATE_WINDOW - 1, acks, None)
                acks, hold = [], where.ack_hold_s
                if where.status != "ok":  # waiting: not leased within a heartbeat
                    continue
                located |= {seq, *where.ahead}
            located.discard(seq)  # fetched (nothing to fetch here): acked on arrival
            if not acks:
                acks_since = time.monotonic()
            acks.append(seq)
            if time.time() >= start_at:
                with lock:
                    counts["batches"] += 1
            seq += 1
            if acks and time.monotonic() - acks_since >= hold:  # no locate carried them in time
                timed("ack", protocol.ack, name, dp_rank, gen, acks, None)
                acks = []
            time.sleep(max(0.0, first + seq / rate - time.time()))  # the trainer's step

    while time.time() < start_at - 0.5:  # clients register just before the window opens
        time.sleep(0.01)
    threads = [threading.Thread(target=producer, args=(i,)) for i in producers]
    threads += [threading.Thread(target=client, args=(r,)) for r in dp_ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.write_text(json.dumps({"counts": counts, "latencies": lat}))
    rpc.leave(graceful=False)


# ----------------------------------------------------------------------------- orchestration


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads: TensorPipe's and Python's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cache: Path, tmp: Path, producers: int, processes: int, seconds: float, dp: int = DP,
        protocol_name: str = "per_batch", rate: float = 0.0, plan_ahead: int = 64) -> dict:
    run_dir = tmp / f"run_{producers}"
    port = free_port()
    micro_batch = MICRO_BATCH if protocol_name == "per_batch" else GLOBAL_BATCH // dp
    serve = ServeProcess(overrides(cache, run_dir, port, **{
        "service.producers": 0, "service.dp_size": dp, "train.micro_batch_size": micro_batch,
        "service.plan_ahead": plan_ahead, "service.heartbeat_s": 1.0, "service.rpc_threads": 16}))
    go = tmp / f"go_{producers}"
    outs = [tmp / f"worker_{producers}_{w}.json" for w in range(processes)]
    try:
        wait_for_status(run_dir, lambda s: True)
        procs = []
        for w, out in enumerate(outs):
            mine = [i for i in range(producers) if i % processes == w]
            ranks = [r for r in range(dp) if r % processes == w]
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--part", "worker", "--port", str(port), "--go", str(go),
                 "--seconds", str(seconds), "--out", str(out), "--producers", ",".join(map(str, mine)),
                 "--ranks", ",".join(map(str, ranks)), "--dp", str(dp), "--micro-batch", str(micro_batch),
                 "--protocol", protocol_name, "--rate", str(rate)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 300
        while not all(o.with_suffix(".ready").exists() for o in outs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("workers did not all join: " + "".join(
                    p.stderr.read().decode()[-2000:] for p in procs if p.poll() is not None))
            time.sleep(0.2)
        start_at = time.time() + 2.0
        go.write_text(str(start_at))
        time.sleep(max(0.0, start_at - time.time()))
        cpu0 = _cpu_s(serve.proc.pid)
        time.sleep(max(0.0, start_at + seconds - time.time()))
        cpu = _cpu_s(serve.proc.pid) - cpu0  # the coordinator process's CPU over the measured window
        for p in procs:
            p.wait(timeout=seconds + 300)
        results = [json.loads(o.read_text()) for o in outs if o.exists()]
        if len(results) != processes:
            raise RuntimeError(f"only {len(results)} of {processes} workers reported")
    finally:
        serve.stop()
    counts = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
    lat = {k: [x for r in results for x in r["latencies"][k]] for k in results[0]["latencies"]}
    batches_per_s = counts["batches"] / dp / seconds  # every DP rank acks every global batch
    need = {stage: dp * 8 * per_gpu / GLOBAL_BATCH for stage, per_gpu in SAMPLES_PER_S_PER_GPU.items()}
    return {
        "producers": producers, "dp_ranks": dp, "trainer_gpus_at_tp8": 8 * dp, "protocol": protocol_name,
        "micro_batch": micro_batch, "paced_batches_per_s": rate or None, "plan_ahead": plan_ahead, "worker_processes": processes,
        "seconds": seconds, "global_batches_per_s": batches_per_s,
        "coordinator_cpu_fraction": cpu / seconds,
        "coordinator_cpu_ms_per_global_batch": 1e3 * cpu / max(1.0, batches_per_s * seconds),
        "coordinator_cpu_ms_per_rpc": 1e3 * cpu / max(1, counts["lease"] + counts["locate"] + counts["ack"]),
        "coordinator_rpcs_per_s": (counts["lease"] + counts["locate"] + counts["ack"]) / seconds,
        "calls": counts, "lease_long_poll": _percentiles(lat["lease"]), "locate": _percentiles(lat["locate"]),
        "ack": _percentiles(lat["ack"]),
        "headroom_vs_512_gpus": {stage: batches_per_s / need for stage, need in NEEDED_BATCHES_PER_S.items()},
        "needed_batches_per_s": need,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["all", "worker"])
    parser.add_argument("--producers", default="64,256", help="all: producer counts; worker: its producer ids")
    parser.add_argument("--ranks", default="", help="(internal) the worker's DP ranks")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--dp", type=int, default=DP, help="DP ranks")
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="(internal)")
    parser.add_argument("--protocol", default="per_batch", choices=["per_batch", "windowed"],
                        help="per_batch: every rank locates and acks each batch as fast as it can (calls/s one "
                             "coordinator sustains); windowed: client.py's protocol paced at --rate")
    parser.add_argument("--rate", type=float, default=0.0, help="windowed: global batches per second")
    parser.add_argument("--plan-ahead", type=int, default=64, help="service.plan_ahead")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--port", type=int)
    parser.add_argument("--go")
    parser.add_argument("--out")
    args = parser.parse_args()
    ids = lambda s: [int(x) for x in s.split(",") if x]
    if args.part == "worker":
        worker(args.port, ids(args.producers), ids(args.ranks), Path(args.go), args.seconds, Path(args.out),
               args.dp, args.micro_batch, args.protocol, args.rate)
        return 0
    started = time.time()
    results: dict = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="mmdit-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        write_cache(cache, 4096, (256, 256), (8, 16), 32)
        for n in ids(args.producers):
            results["runs"].append(run(cache, tmp, n, args.processes, args.seconds, args.dp, args.protocol,
                                       args.rate, args.plan_ahead))
            print(json.dumps(results["runs"][-1]), flush=True)
    write_results(results, Path(args.results), started, "python bench/coordinator_scale.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
