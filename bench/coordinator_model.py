"""Coordinator scale model: `python bench/coordinator_model.py` -> bench/results/coordinator_model.json.

The real `Coordinator` class in this one process, on a fake clock, with simulated DP-rank clients
and producers that call it as dataservice/client.py and server.py do, minus RPC: producers
long-poll `lease` and hold what they are given (preparing takes no time), clients fetch
`prefetch` batches ahead of a trainer that consumes one global batch every 1/rate seconds and
reports its step, and the service's reaper ticks every 0.1 s and writes its status every second.
Only the time spent inside the coordinator's methods is counted (thread CPU time): its cost per
global batch and the calls it answers per global batch, as DP ranks go 64 -> 512 and producers
64 -> 1,024, at the rate a job of that size needs at 256 px.

Two client protocols, side by side on the same machine in the same run:
- `per_batch` (the client before issue 26): a `locate` for every batch it was not told of
  (look-ahead 2 x prefetch), its acks every `ack_interval_s` (20 ms) in one call, the step's
  report with them (a call of its own each step when no ack is due);
- `windowed` (dataservice/client.py now): one `locate` names the owners of a window of
  `LOCATE_WINDOW` batches and carries the acks and the report; acks go alone only after the
  hold the coordinator allows (`Location.ack_hold_s`), a report alone as late (at least a heartbeat).

and two coordinators: this checkout's, and the one of `--baseline` (a git revision, loaded from
`git show`) with the protocol it spoke. `coordinator_scale.py` measures what the RPC layer costs
per call; docs/capacity.md puts the two together.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "coordinator_model.json"
TP, GLOBAL_BATCH = 8, 2048
SAMPLES_PER_S_PER_GPU = {"256": 15.64, "640": 3.87, "1328": 0.75}
"""`mmdit capacity` (Qwen-Image 20B at MFU 0.40): a job of G trainer GPUs needs G x this / 2048
global batches per second."""
RTT_S, FETCH_S, REAP_S, STATUS_S = 0.001, 0.005, 0.1, 1.0


def needed_batches_per_s(dp_ranks: int, stage: str = "256") -> float:
    return dp_ranks * TP * SAMPLES_PER_S_PER_GPU[stage] / GLOBAL_BATCH


def load_baseline(revision: str):
    """The Coordinator class of `revision` (its coordinator.py; the rest of the package is this checkout's)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:dataservice/coordinator.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="mmdit-baseline-")) / "baseline_coordinator.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mmdit.dataservice.baseline_coordinator", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.Coordinator


class Events:
    """A fake clock and its event queue."""

    def __init__(self) -> None:
        self.now, self.n, self.queue = 0.0, 0, []

    def __call__(self) -> float:
        return self.now

    def at(self, t: float, fn, *args) -> None:
        self.n += 1
        heapq.heappush(self.queue, (t, self.n, fn, args))

    def run_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            t, _, fn, args = heapq.heappop(self.queue)
            self.now = max(self.now, t)
            fn(*args)


class Meter:
    """Thread CPU time and calls inside the coordinator, by kind."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __call__(self, kind: str, fn, *args):
        t0 = time.thread_time()
        out = fn(*args)
        self.cpu[kind] = self.cpu.get(kind, 0.0) + time.thread_time() - t0
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return out


class Producer:
    def __init__(self, model: Model, i: int):
        self.model, self.name, self.rank, self.held = model, f"producer_{i}", 1000 + i, set()

    def poll(self) -> None:
        m = self.model
        fut = m.meter("lease", m.coord.lease, self.name, self.rank, m.depth, sorted(self.held))
        fut.add_done_callback(lambda f: m.events.at(m.events.now + RTT_S, self.on_reply, f.value()))

    def on_reply(self, reply) -> None:
        keep = {(reply.gen, s) for s in reply.keep}
        self.held = (self.held | {(reply.gen, s) for s, _ in reply.new}) & keep
        self.model.events.at(self.model.events.now + RTT_S, self.poll)


class Client:
    """One DP rank's client: fetches in plan order up to `prefetch` ahead of its trainer."""

    def __init__(self, model: Model, dp_rank: int):
        self.model, self.dp_rank, self.name = model, dp_rank, f"trainer_{dp_rank}"
        reg = model.meter("register", model.coord.register_consumer, self.name, 5000 + dp_rank, dp_rank, model.dp,
                          model.mbs, None, None)
        self.gen = reg.gen
        self.consumed = self.next_fetch = 0  # the next batch the trainer takes; the next to fetch
        self.fetched: set[int] = set()
        self.located: dict[int, str] = {}
        self.locating = self.flush_due = False
        self.acks: list[int] = []
        self.report: dict | None = None
        self.hold_s = 0.0  # the last Location's ack_hold_s
        self.waiting = False

    # the trainer: one step per 1/rate seconds, waiting for its batch when it is not there
    def step(self) -> None:
        m = self.model
        if self.consumed not in self.fetched:
            self.waiting = True
            return
        self.waiting = False
        self.fetched.discard(self.consumed)
        self.consumed += 1
        self.report = {"step": self.consumed, "loss": 0.1, "samples_per_second": 1.0}
        self.want_flush()
        self.fill()
        m.events.at(m.events.now + 1.0 / m.rate, self.step)

    def fill(self) -> None:
        m = self.model
        while self.next_fetch < self.consumed + m.prefetch and not self.locating:
            seq = self.next_fetch
            if seq not in self.located:
                self.locate(seq)
                return
            del self.located[seq]
            self.next_fetch += 1
            m.events.at(m.events.now + FETCH_S, self.arrived, seq)

    def arrived(self, seq: int) -> None:
        self.fetched.add(seq)
        self.acks.append(seq)
        self.want_flush()
        if self.waiting:
            self.step()

    def locate(self, seq: int) -> None:
        m = self.model
        self.locating = True
        if m.protocol == "windowed":
            acks, self.acks, report, self.report = self.acks, [], self.report, None
            fut = m.meter("locate", m.coord.locate, self.name, self.gen, seq, m.window - 1, acks, report)
        else:
            fut = m.meter("locate", m.coord.locate, self.name, self.gen, seq, 2 * m.prefetch)
        fut.add_done_callback(lambda f: m.events.at(m.events.now + RTT_S, self.on_location, seq, f.value()))

    def on_location(self, seq: int, where) -> None:
        self.locating = False
        self.hold_s = getattr(where, "ack_hold_s", 0.0)
        if where.status == "ok":
            self.located[seq] = where.owner
            for s, (owner, _, _) in where.ahead.items():
                if s >= self.next_fetch:
                    self.located[s] = owner
        elif where.status != "waiting":
            raise RuntimeError(f"{self.name}: locate({seq}) answered {where.status}")
        self.fill()

    def want_flush(self) -> None:
        """Schedule the next standalone ack call: every ack_interval_s (per_batch), or once acks
        waited the hold (a report as long, at least a heartbeat) without a locate to carry them (windowed)."""
        m = self.model
        if self.flush_due or not (self.acks or self.report):
            return
        self.flush_due = True
        delay = m.ack_interval_s
        if m.protocol == "windowed":
            delay = max(delay, self.hold_s if self.acks else max(self.hold_s, m.heartbeat_s))
        m.events.at(m.events.now + delay, self.flush)

    def flush(self) -> None:
        self.flush_due = False
        if not (self.acks or self.report):
            return
        m = self.model
        acks, self.acks, report, self.report = self.acks, [], self.report, None
        m.meter("ack", m.coord.ack, self.name, self.dp_rank, self.gen, acks, report)
        self.fill()


class Model:
    def __init__(self, coordinator_cls, protocol: str, dp: int, producers: int, rate: float, window: int = 32,
                 prefetch: int = 4, depth: int = 4, heartbeat_s: float = 1.0, ack_interval_s: float = 0.02):
        from mmdit.config.service import CoordinatorSettings
        from mmdit.dataservice.plan import DataVersion, SampleRef, Selection

        self.protocol, self.dp, self.rate, self.window = protocol, dp, rate, window
        self.prefetch, self.depth, self.ack_interval_s = prefetch, depth, ack_interval_s
        self.heartbeat_s = heartbeat_s
        self.mbs = GLOBAL_BATCH // dp
        self.events, self.meter = Events(), Meter()
        refs = [SampleRef(f"k{i:06d}", (256, 256), "t2i") for i in range(8 * GLOBAL_BATCH)]
        history = [DataVersion(0, 0, 0, task_weights={"t2i": 1.0})]
        settings = CoordinatorSettings(plan_ahead=64, heartbeat_s=heartbeat_s, lease_timeout_s=10.0)
        self.coord = coordinator_cls(Selection(refs), settings, 0, dp, self.mbs, history, clock=self.events)
        self.producers = [Producer(self, i) for i in range(producers)]
        self.clients = [Client(self, r) for r in range(dp)]
        for i, p in enumerate(self.producers):  # spread over a heartbeat, as producers start at different times
            self.events.at(heartbeat_s * i / producers, p.poll)
        for c in self.clients:
            self.events.at(0.0, c.fill)
            self.events.at(1.0 / rate, c.step)
        self._tick()
        self._status()

    def _tick(self) -> None:
        self.meter("reap", self.coord.reap)
        self.events.at(self.events.now + REAP_S, self._tick)

    def _status(self) -> None:
        self.meter("status", self.coord.status)
        self.events.at(self.events.now + STATUS_S, self._status)

    def run(self, warmup_s: float, seconds: float) -> dict:
        self.events.run_until(warmup_s)
        done0 = self.coord.counters["batches_done"]
        self.meter.cpu, self.meter.calls = {}, {}
        wall0 = time.perf_counter()
        self.events.run_until(warmup_s + seconds)
        wall = time.perf_counter() - wall0
        batches = self.coord.counters["batches_done"] - done0
        cpu = sum(self.meter.cpu.values())
        return {"sim_seconds": seconds, "global_batches": batches, "global_batches_per_s": batches / seconds,
                "coordinator_cpu_s": cpu, "cpu_ms_per_global_batch": 1e3 * cpu / max(1, batches),
                "coordinator_utilization": cpu / seconds,
                "calls_per_s": {k: v / seconds for k, v in sorted(self.meter.calls.items())},
                "calls_per_global_batch": sum(self.meter.calls.values()) / max(1, batches),
                "cpu_ms_by_kind": {k: 1e3 * v for k, v in sorted(self.meter.cpu.items())},
                "model_wall_s": wall}


def measure(coordinator_cls, protocol: str, dp: int, producers: int, seconds: float, rate: float | None = None,
            stage: str = "256") -> dict:
    rate = rate or needed_batches_per_s(dp, stage)
    out = Model(coordinator_cls, protocol, dp, producers, rate).run(warmup_s=3.0, seconds=seconds)
    if out["global_batches_per_s"] < 0.95 * rate:
        raise RuntimeError(f"dp {dp}, {producers} producers, {protocol}: the model kept up with "
                           f"{out['global_batches_per_s']:.1f} of {rate:.1f} batches/s")
    return {"dp_ranks": dp, "trainer_gpus": dp * TP, "producers": producers, "protocol": protocol, "stage": stage,
            "rate_batches_per_s": rate, **out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x64,64x256,128x256,256x512,512x1024",
                        help="DP ranks x producers, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="simulated seconds measured per size")
    parser.add_argument("--baseline", default="", help="git revision whose coordinator runs beside this one")
    parser.add_argument("--stages", default="256", help="resolutions whose needed rate the trainers run at "
                        f"({', '.join(SAMPLES_PER_S_PER_GPU)}), comma-separated")
    parser.add_argument("--protocols", default="windowed,per_batch", help="this checkout's client protocols to run")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.getLogger("mmdit.coordinator").setLevel(logging.ERROR)
    from mmdit.dataservice.coordinator import Coordinator

    variants = [("current", Coordinator, protocol) for protocol in args.protocols.split(",")]
    if args.baseline:
        variants.append((f"baseline {args.baseline}", load_baseline(args.baseline), "per_batch"))
    started, runs = time.time(), []
    for stage, size in [(stage, size) for stage in args.stages.split(",") for size in args.sizes.split(",")]:
        dp, producers = (int(x) for x in size.split("x"))
        for label, cls, protocol in variants:
            runs.append({"coordinator": label, **measure(cls, protocol, dp, producers, args.seconds, stage=stage)})
            r = runs[-1]
            print(f"{label:>18} {protocol:>9} {stage:>4} px dp {dp:4d} producers {producers:5d}: "
                  f"{r['cpu_ms_per_global_batch']:7.2f} ms/batch, {r['calls_per_global_batch']:7.1f} calls/batch, "
                  f"utilization {r['coordinator_utilization']:.3f} at {r['rate_batches_per_s']:.1f} batches/s",
                  flush=True)
    results = {"runs": runs, "tp": TP, "global_batch": GLOBAL_BATCH, "needed_samples_per_s_per_gpu":
               SAMPLES_PER_S_PER_GPU, "wall_s": time.time() - started,
               "reproduce": "python bench/coordinator_model.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
