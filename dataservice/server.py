"""A producer as an RPC server: it leases planned batches, prepares them ahead, and serves them.

Loop: long-poll the coordinator's `lease` with the batches it holds; the reply names new batches
to prepare and the ones to keep (the rest were acked everywhere, or revoked: drop them).
`prepare_workers` threads prepare held batches earliest first (so a batch revoked from a dead
producer, which some DP rank is waiting for, goes ahead of newer work): read the records from
the latent cache and collate one tensor dict per DP rank (so a fetch sends exactly its shard:
TensorPipe sends whole storages, a slice would drag the full batch along). Clients call
`fetch(uid, dp_rank)`, a long poll answered when the batch is ready or after a heartbeat.

Serving is from the cache, every record checked (cache/store.py). A key missing from it or
damaged there goes to `encode_hook(keys) -> records` when one is installed (a producer with
encoders loaded encodes on a miss); without one the batch is served without it, logged and
counted (a batch left with fewer samples than DP ranks repeats intact ones). `service.simulate_encode_s`
adds that long to every batch, like an encoder would (benchmarks).

Run as a process: `mmdit producer key=value ...` (what `mmdit serve` starts, once per producer).
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.futures import Future

from mmdit.cache import DamagedRecord
from mmdit.config.service import ProducerSettings
from mmdit.dataservice import protocol, rpc
from mmdit.dataservice.address import ServiceUnreachable, resolve
from mmdit.dataservice.plan import PlanError, PlannedBatch, shard_bounds
from mmdit.dataservice.protocol import Lease, Shard

log = logging.getLogger("mmdit.producer")


def collate(records: list[dict], batch: PlannedBatch, *, seq: int, gen: int, producer: str) -> dict:
    """One DP shard in the design brief's Batch layout; prompt embeddings zero-padded to the
    longest prompt of the shard, `prompt_mask` marking real tokens. Tensors keep the dtype the
    cache stores (prompt features bf16 or fp32); a shard mixing both is fp32, whatever the order."""
    if not records:
        raise ValueError(f"batch {batch.batch_id}: empty shard")
    lengths = [r["prompt_embeds"].shape[0] for r in records]
    dim = records[0]["prompt_embeds"].shape[1]
    dtype = functools.reduce(torch.promote_types, (r["prompt_embeds"].dtype for r in records))
    embeds = torch.zeros(len(records), max(lengths), dim, dtype=dtype)
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
    waiters: list = field(default_factory=list)  # (Future, dp_rank, deadline)


class ProducerServer:
    """Holds leased batches, prepares them on worker threads and answers fetches."""

    def __init__(self, settings: ProducerSettings, cache, stages: dict[int, str] | str, name: str, rank: int,
                 encode_hook: Callable[[list[str], int], list[dict]] | None = None, clock=time.monotonic):
        """`stages`: curriculum stage -> cache fingerprint (a bare fingerprint: one stage, 0);
        `encode_hook(keys, stage) -> records` encodes what the cache lacks."""
        self.cfg, self.cache, self.name, self.rank = settings, cache, name, rank
        self.stages = {0: stages} if isinstance(stages, str) else dict(stages)
        self.encode_hook, self.clock = encode_hook, clock
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.queue: list[tuple[int, tuple[int, int]]] = []
        self.gen = -1
        self.counters = {"leased": 0, "prepared": 0, "served": 0, "dropped": 0, "errors": 0, "damaged": 0,
                         "missing": 0, "encoded": 0, "cache_hits": 0, "cache_misses": 0}
        self._closed = False
        self._workers = [threading.Thread(target=self._prepare_loop, name=f"prepare-{i}", daemon=True)
                         for i in range(settings.prepare_workers)]
        for t in self._workers:
            t.start()

    # ---- leases

    def held(self) -> list[tuple[int, int]]:
        with self.lock:
            return sorted(self.slots)

    def apply(self, reply: Lease) -> None:
        """Take a lease reply: drop what is not kept, queue new batches for preparation."""
        keep = {(reply.gen, seq) for seq in reply.keep}
        done = []
        with self.lock:
            self.gen = reply.gen
            for uid in [u for u in self.slots if u not in keep]:
                slot = self.slots.pop(uid)
                self.counters["dropped"] += 1
                done += [(f, Shard("not_held")) for f, _, _ in slot.waiters]
            for seq, batch in reply.new:
                uid = (reply.gen, seq)
                if uid in keep and uid not in self.slots:
                    self.slots[uid] = _Slot(uid, batch, reply.dp_size)
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
            _complete([(f, self._answer(slot, r)) for f, r, _ in waiters])

    def _records(self, keys: list[str], stage: int) -> list[dict]:
        """The batch's records, in plan order. A key missing from the cache or damaged there goes
        to the encoder hook when there is one; else it is left out (logged with its file, counted
        in `damaged`/`missing`), and the batch is served without it."""
        found, problems = self.cache.read_available(keys, self.stages[stage])
        self.counters["cache_hits"] += len(found)
        self.counters["cache_misses"] += len(problems)
        if problems and self.encode_hook is not None:
            encoded = self.encode_hook(list(problems), stage)
            found.update({r["key"]: r for r in encoded})
            self.counters["encoded"] += len(encoded)
        lost = [k for k in dict.fromkeys(keys) if k not in found]
        for key in lost:
            self.counters["damaged" if isinstance(problems.get(key), DamagedRecord) else "missing"] += 1
            log.warning("batch without %s: %s", key, problems.get(key))
        return [found[k] for k in keys if k in found]

    def prepare(self, batch: PlannedBatch, dp_size: int, uid: tuple[int, int]) -> list[dict]:
        if self.cfg.simulate_encode_s:
            time.sleep(self.cfg.simulate_encode_s)  # an encoder's time, spent before the batch exists
        records = self._records(list(batch.keys), batch.stage)
        if not records:
            raise ValueError(f"every record of the batch is missing or damaged in the cache (first key "
                             f"{batch.keys[0]!r}): run `mmdit cache verify --repair` and `mmdit produce`")
        if len(records) < dp_size:  # keep every DP rank busy: repeat intact records of this batch
            records = [records[i % len(records)] for i in range(dp_size)]
        shards = []
        for r in range(dp_size):
            lo, hi = shard_bounds(len(records), r, dp_size)
            shards.append(collate(records[lo:hi], batch, seq=uid[1], gen=uid[0], producer=self.name))
        return shards

    # ---- serving

    def _answer(self, slot: _Slot, dp_rank: int) -> Shard:
        if slot.error is not None:
            return Shard("error", message=slot.error)
        with self.lock:
            self.counters["served"] += 1
        return Shard("ok", slot.shards[dp_rank])

    def fetch(self, uid: tuple[int, int], dp_rank: int) -> Future:
        """DP rank `dp_rank`'s shard of batch `uid`: at once when prepared, else when it is, or
        `not_ready` after a heartbeat (the client then checks the lease did not move)."""
        fut: Future = Future()
        with self.lock:
            slot = self.slots.get(uid)
            if slot is not None and slot.shards is None and slot.error is None:
                slot.waiters.append((fut, dp_rank, self.clock() + self.cfg.heartbeat_s))
                return fut
        fut.set_result(Shard("not_held") if slot is None else self._answer(slot, dp_rank))
        return fut

    def expire_fetches(self) -> None:
        """Answer fetches that waited a heartbeat for their batch with `not_ready`."""
        now, done = self.clock(), []
        with self.lock:
            for slot in self.slots.values():
                if slot.waiters:
                    expired = [w for w in slot.waiters if w[2] <= now]
                    slot.waiters = [w for w in slot.waiters if w[2] > now]
                    done += [(f, Shard("not_ready")) for f, _, _ in expired]
        _complete(done)

    def peek(self, uid: tuple[int, int], dp_rank: int) -> dict | None:
        """A prepared shard, without waiting or counting (diagnostics, transport baselines)."""
        with self.lock:
            slot = self.slots.get(uid)
            return None if slot is None or slot.shards is None else slot.shards[dp_rank]

    # ---- the lease loop

    def run(self, stop, give_up_after_s: float) -> bool:
        """Lease until `stop` is set; True if the coordinator stayed reachable to the end.
        Gives up when the coordinator stays unreachable for `give_up_after_s` (service.join_timeout_s
        in a producer process: as long as it would wait for a starting coordinator)."""
        cfg = self.cfg
        unreachable_since = None
        while not stop.is_set():
            try:
                reply = rpc.call(rpc.COORDINATOR, protocol.lease, self.name, self.rank, cfg.prepare_depth,
                                 self.held(), self.encode_hook is not None, self.telemetry(),
                                 timeout_s=cfg.heartbeat_s + cfg.rpc_timeout_s, retries=2)
                unreachable_since = None
            except rpc.RpcError as e:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > give_up_after_s:
                    log.error("coordinator unreachable for %.0fs (%s); stopping", give_up_after_s, e)
                    return False
                stop.wait(0.5)
                continue
            self.apply(reply)
            if reply.stop:
                break
        try:
            rpc.call(rpc.COORDINATOR, protocol.producer_left, self.name, timeout_s=5.0)
        except rpc.RpcError:
            return False
        return True

    def telemetry(self) -> dict:
        """What the coordinator's /metrics reports of this producer (sent with each heartbeat)."""
        c = self.counters
        return {"batches_served": c["served"], "cache_hits": c["cache_hits"], "cache_misses": c["cache_misses"],
                "encoded": c["encoded"]}

    def close(self) -> None:
        with self.lock:
            self._closed = True
            done = [(f, Shard("not_held")) for s in self.slots.values() for f, _, _ in s.waiters]
            self.work.notify_all()
        _complete(done)


def _complete(done: list) -> None:
    for fut, value in done:
        if not fut.done():
            fut.set_result(value)


class _FetchExpiry(threading.Thread):
    """Answers long-polled fetches whose heartbeat ran out, also while the lease loop waits."""

    def __init__(self, server: ProducerServer, stop: threading.Event):
        super().__init__(name="fetch-expiry", daemon=True)
        self.server, self.stop = server, stop

    def run(self) -> None:
        period = min(0.1, self.server.cfg.heartbeat_s / 4)
        while not self.stop.wait(period):
            self.server.expire_fetches()


# ----------------------------------------------------------------------------- process entry


def _on_demand_encoder(cfg, cache, stages: dict[int, str]):
    """The encoders of `encoders.dir` as an encode hook, when they made this cache."""
    if not cfg.encoders.dir:
        return None
    from mmdit.producer.on_demand import OnDemandEncoder

    hook = OnDemandEncoder(cfg, cache)
    if not any(hook.fingerprint(stage) == fp for stage, fp in stages.items()):
        log.warning("encoders.dir=%s did not write this cache (fingerprint %s, cache %s): not encoding on a miss",
                    cfg.encoders.dir, hook.fingerprint(min(stages)), sorted(stages.values()))
        return None
    return hook


def run_producer(cfg) -> int:
    """One producer process: join the job's RPC group, serve until SIGTERM/SIGINT, leave; the
    process's exit code (2: the cache cannot be served)."""
    from mmdit.cache import LatentCache
    from mmdit.dataservice.selection import resolve_fingerprint, resolve_stages

    settings = cfg.service.role(ProducerSettings)
    name = rpc.incarnation_name("producer", n=int(os.environ.get("MMDIT_INCARNATION", "0")))
    from mmdit.utils.processes import SignalStop

    stop = SignalStop()
    cache = LatentCache(cfg.cache.dir)
    try:
        fingerprint = resolve_fingerprint(cache, settings.fingerprint)
    except PlanError as e:
        print(f"mmdit producer: {e}", file=sys.stderr)
        return 2
    stages = resolve_stages(cache, fingerprint)
    encode_hook = _on_demand_encoder(cfg, cache, stages)
    try:
        address = resolve(settings, settings.join_timeout_s)
        rank = rpc.join(name, address.host, address.port, service_id=address.service_id,
                        advertise_host=settings.advertise_host, rpc_timeout_s=settings.rpc_timeout_s,
                        join_timeout_s=settings.join_timeout_s, num_worker_threads=settings.rpc_threads)
    except (rpc.RpcError, ServiceUnreachable) as e:
        print(f"mmdit producer: {e}", file=sys.stderr)
        return 2 if isinstance(e, rpc.JoinRejected) else 1
    server = ProducerServer(settings, cache, stages, name, rank, encode_hook)
    protocol.serve(protocol.PRODUCER, server)
    halt = threading.Event()
    _FetchExpiry(server, halt).start()
    log.info("producer %s (rank %d) serving %s from %s%s", name, rank, sorted(stages.values()), cfg.cache.dir,
             "; encodes on a miss" if encode_hook else "")
    reachable = False
    try:
        reachable = server.run(stop, give_up_after_s=settings.join_timeout_s)
    finally:
        halt.set()
        server.close()
        graceful = rpc.leave(graceful=reachable, timeout_s=settings.shutdown_timeout_s)
        protocol.stop_serving(protocol.PRODUCER)
        cache.close()
        log.info("producer %s stopped (%s); counters %s", name, "graceful" if graceful else "not graceful",
                 server.counters)
        stop.restore()
    return 0 if reachable or stop.is_set() else 1
