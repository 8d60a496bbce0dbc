"""A producer as an RPC server: it leases planned batches, prepares them ahead, and serves them.

Loop: long-poll the coordinator's `lease` (producer/coordinator.py) with the batches it holds;
the reply names new batches to prepare and the ones to keep (the rest were acked everywhere, or
revoked: drop them). `prepare_workers` threads prepare held batches earliest first: read the
records from the latent cache, collate one tensor dict per DP rank (so a fetch sends exactly its
shard: TensorPipe sends whole storages, a slice would drag the full batch along). Trainer clients
call `fetch(uid, dp_rank)`; it answers when the batch is ready.

Serving is from the cache. A key missing from it goes to `encode_hook(keys) -> records` when one
is installed (a producer with encoders loaded can encode on a miss); without one the batch fails
with an error that names the key, and the client surfaces it. `service.simulate_encode_s` adds
that long to every batch, like an encoder would (benchmarks).

Run as a process: `python -m mmdit.producer.server key=value ...` (what `mmdit serve` starts).
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.rpc.functions import async_execution
from torch.futures import Future

from mmdit.producer import rpc
from mmdit.producer.coordinator import resolve_fingerprint, rpc_lease, rpc_producer_left
from mmdit.producer.plan import PlanError, PlannedBatch, shard_bounds

log = logging.getLogger("mmdit.producer.server")


def collate(records: list[dict], batch: PlannedBatch, *, seq: int, gen: int, producer: str) -> dict:
    """One DP shard in the design brief's Batch layout; prompt embeddings zero-padded to the
    longest prompt of the shard, `prompt_mask` marking real tokens."""
    if not records:
        raise ValueError(f"batch {batch.batch_id}: empty shard")
    lengths = [r["prompt_embeds"].shape[0] for r in records]
    dim = records[0]["prompt_embeds"].shape[1]
    embeds = torch.zeros(len(records), max(lengths), dim, dtype=records[0]["prompt_embeds"].dtype)
    mask = torch.zeros(len(records), max(lengths), dtype=torch.bool)
    for i, (r, n) in enumerate(zip(records, lengths)):
        embeds[i, :n] = r["prompt_embeds"]
        mask[i, :n] = True
    out = {
        "latents": torch.stack([r["latents"] for r in records]),
        "prompt_embeds": embeds,
        "prompt_mask": mask,
        "task": [r["task"] for r in records],
        "keys": [r["key"] for r in records],
        "batch_id": batch.batch_id,
        "config_version": batch.config_version,
        "seq": seq,
        "gen": gen,
        "bucket": tuple(batch.bucket),
        "producer": producer,
    }
    conds = [r.get("cond_latents") for r in records]
    if any(c is not None for c in conds):
        if any(c is None for c in conds):
            raise ValueError(f"batch {batch.batch_id}: some records lack cond_latents")
        out["cond_latents"] = torch.stack(conds)
    return out


@dataclass
class _Slot:
    uid: tuple[int, int]
    batch: PlannedBatch
    dp_size: int
    shards: list[dict] | None = None
    error: str | None = None
    waiters: list = field(default_factory=list)  # (Future, dp_rank)


class ProducerServer:
    """Holds leased batches, prepares them on worker threads and answers fetches."""

    def __init__(self, svc, cache, fingerprint: str, name: str, rank: int,
                 encode_hook: Callable[[list[str]], list[dict]] | None = None):
        self.svc, self.cache, self.fp, self.name, self.rank = svc, cache, fingerprint, name, rank
        self.encode_hook = encode_hook
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.queue: list[tuple[int, tuple[int, int]]] = []
        self.gen = -1
        self.counters = {"leased": 0, "prepared": 0, "served": 0, "dropped": 0, "errors": 0}
        self._closed = False
        self._workers = [threading.Thread(target=self._prepare_loop, name=f"prepare-{i}", daemon=True)
                         for i in range(svc.prepare_workers)]
        for t in self._workers:
            t.start()

    # ---- leases

    def held(self) -> list[tuple[int, int]]:
        with self.lock:
            return sorted(self.slots)

    def apply(self, reply: dict) -> None:
        """Take a lease reply: drop what is not kept, queue new batches for preparation."""
        gen = reply["gen"]
        keep = {(gen, seq) for seq in reply["keep"]}
        done = []
        with self.lock:
            self.gen = gen
            for uid in [u for u in self.slots if u not in keep]:
                slot = self.slots.pop(uid)
                self.counters["dropped"] += 1
                done += [(f, {"status": "not_held"}) for f, _ in slot.waiters]
            for seq, batch in reply["leases"]:
                uid = (gen, seq)
                if uid in keep and uid not in self.slots:
                    self.slots[uid] = _Slot(uid, batch, reply["dp_size"])
                    heapq.heappush(self.queue, (seq, uid))
                    self.counters["leased"] += 1
            self.work.notify_all()
        _complete(done)

    # ---- preparation

    def _prepare_loop(self) -> None:
        while True:
            with self.lock:
                while not self._closed and not self.queue:
                    self.work.wait()
                if self._closed:
                    return
                _, uid = heapq.heappop(self.queue)
                slot = self.slots.get(uid)
            if slot is None:
                continue  # dropped before we got to it
            try:
                shards, error = self.prepare(slot.batch, slot.dp_size, uid), None
            except Exception as e:  # noqa: BLE001 - reported to the client that fetches this batch
                log.exception("batch %s failed", slot.batch.batch_id)
                shards, error = None, f"producer {self.name}: batch {slot.batch.batch_id}: {type(e).__name__}: {e}"
            with self.lock:
                slot.shards, slot.error = shards, error
                self.counters["prepared" if error is None else "errors"] += 1
                waiters, slot.waiters = slot.waiters, []
            _complete([(f, self._answer(slot, r)) for f, r in waiters])

    def _records(self, keys: list[str]) -> list[dict]:
        missing = [k for k in keys if not self.cache.contains(k, self.fp)]
        if missing and self.encode_hook is None:
            raise KeyError(f"{len(missing)} keys missing from the cache (first {missing[0]!r}) and this producer "
                           "has no encoder hook")
        found = dict(zip([k for k in keys if k not in missing],
                         self.cache.read_many([k for k in keys if k not in missing], self.fp)))
        if missing:
            found.update({r["key"]: r for r in self.encode_hook(missing)})
        return [found[k] for k in keys]

    def prepare(self, batch: PlannedBatch, dp_size: int, uid: tuple[int, int]) -> list[dict]:
        if self.svc.simulate_encode_s:
            time.sleep(self.svc.simulate_encode_s)  # an encoder's time, spent before the batch exists
        records = self._records(list(batch.keys))
        shards = []
        for r in range(dp_size):
            lo, hi = shard_bounds(len(records), r, dp_size)
            shards.append(collate(records[lo:hi], batch, seq=uid[1], gen=uid[0], producer=self.name))
        return shards

    # ---- serving

    def _answer(self, slot: _Slot, dp_rank: int) -> dict:
        if slot.error is not None:
            return {"status": "error", "message": slot.error}
        with self.lock:
            self.counters["served"] += 1
        return {"status": "ok", "batch": slot.shards[dp_rank]}

    def fetch(self, uid: tuple[int, int], dp_rank: int) -> Future:
        fut: Future = Future()
        with self.lock:
            slot = self.slots.get(tuple(uid))
            if slot is not None and slot.shards is None and slot.error is None:
                slot.waiters.append((fut, dp_rank))
                return fut
        fut.set_result({"status": "not_held"} if slot is None else self._answer(slot, dp_rank))
        return fut

    def peek(self, uid: tuple[int, int], dp_rank: int) -> dict | None:
        """A prepared shard, without waiting or counting (diagnostics, transport baselines)."""
        with self.lock:
            slot = self.slots.get(tuple(uid))
            return None if slot is None or slot.shards is None else slot.shards[dp_rank]

    # ---- the lease loop

    def run(self, stop: threading.Event) -> bool:
        """Lease until `stop` is set; True if the coordinator stayed reachable to the end."""
        svc = self.svc
        unreachable_since = None
        while not stop.is_set():
            try:
                reply = rpc.call(rpc.COORDINATOR, rpc_lease, self.name, self.rank, svc.prepare_depth,
                                 self.held(), timeout_s=svc.heartbeat_s + svc.rpc_timeout_s, retries=2)
                unreachable_since = None
            except rpc.RpcError as e:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > svc.consumer_timeout_s:
                    log.error("coordinator unreachable for %.0fs (%s); stopping", svc.consumer_timeout_s, e)
                    return False
                stop.wait(0.5)
                continue
            self.apply(reply)
            if reply.get("stop"):
                break
        try:
            rpc.call(rpc.COORDINATOR, rpc_producer_left, self.name, timeout_s=5.0)
        except rpc.RpcError:
            return False
        return True

    def close(self) -> None:
        with self.lock:
            self._closed = True
            done = [(f, {"status": "not_held"}) for s in self.slots.values() for f, _ in s.waiters]
            self.work.notify_all()
        _complete(done)


def _complete(done: list) -> None:
    for fut, value in done:
        if not fut.done():
            fut.set_result(value)


# ----------------------------------------------------------------------------- RPC entry points

_SERVER: ProducerServer | None = None


@async_execution
def rpc_fetch(uid: tuple[int, int], dp_rank: int) -> Future:
    if _SERVER is None:
        fut: Future = Future()
        fut.set_result({"status": "not_held"})
        return fut
    return _SERVER.fetch(uid, dp_rank)


def rpc_peek(uid: tuple[int, int], dp_rank: int) -> dict | None:
    return None if _SERVER is None else _SERVER.peek(uid, dp_rank)


def rpc_counters() -> dict:
    return {} if _SERVER is None else dict(_SERVER.counters)


# ----------------------------------------------------------------------------- process entry


def main(argv: list[str]) -> int:
    """One producer process: join the job's RPC group, serve until SIGTERM/SIGINT, leave."""
    global _SERVER
    from mmdit.launch.config import load_config
    from mmdit.producer.cache import LatentCache

    cfg = load_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    svc = cfg.service
    name = rpc.incarnation_name("producer", n=int(os.environ.get("MMDIT_INCARNATION", "0")))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cache = LatentCache(cfg.cache.dir)
    try:
        fingerprint = resolve_fingerprint(cache, svc.fingerprint)
    except PlanError as e:
        print(f"producer: {e}", file=sys.stderr)
        return 2
    rank = rpc.join(name, svc.host, svc.port, rpc_timeout_s=svc.rpc_timeout_s, join_timeout_s=svc.join_timeout_s,
                    num_worker_threads=svc.rpc_threads)
    _SERVER = server = ProducerServer(svc, cache, fingerprint, name, rank)
    log.info("producer %s (rank %d) serving %s from %s", name, rank, fingerprint, cfg.cache.dir)
    reachable = False
    try:
        reachable = server.run(stop)
    finally:
        server.close()
        graceful = rpc.leave(graceful=reachable, timeout_s=svc.shutdown_timeout_s)
        cache.close()
        log.info("producer %s stopped (%s); counters %s", name, "graceful" if graceful else "not graceful",
                 server.counters)
    return 0 if reachable or stop.is_set() else 1


if __name__ == "__main__":
    # Run main() in the importable module, not in __main__: RPC resolves rpc_fetch through
    # `mmdit.producer.server`, whose _SERVER must be the one serving.
    from mmdit.producer import server as _module

    sys.exit(_module.main(sys.argv[1:]))
