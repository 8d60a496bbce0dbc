"""The coordinator: one per job; owns the batch plan, leases, acks, the cursor and the mixture history.

Protocol (every call is an RPC to the coordinator, rank 0 of the group; see producer/rpc.py):
- a producer long-polls `lease(name, rank, depth)`: the reply lists the batches it must prepare
  (at most one new one per call, so consecutive batches spread over producers) and `keep`, every
  batch it still holds; it drops the rest (acked, or revoked). The call is its heartbeat.
- a trainer client registers with its cursor and mixture history (`register_consumer`), then for
  each global batch `seq` it `locate`s the producer that holds it, fetches its DP shard from that
  producer, and `ack`s it after the step (acks travel in small groups). A batch acked by every
  DP rank is done; its producer is told to drop it and gets new work in the same answer.
- a producer silent for `lease_timeout_s`, or reported dead by a client whose fetch failed with a
  transport error, loses its leases: they go back to the pending queue, in plan order, and the
  next producer that asks gets them. Batches are pure functions of the plan, so a batch prepared
  twice is the same batch; the client consumes each `seq` exactly once.

Resets: a client that registers with a cursor, DP layout or history different from the
coordinator's starts a new plan *generation* from that cursor: everything planned before is
dropped (producers are told through `keep`), stale clients get `stale` answers.

Hot-swap: `update_mixture` appends a mixture version that takes effect at the first batch not
yet planned; batches already planned (leased, maybe prepared) keep their version.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch.distributed.rpc.functions import async_execution
from torch.futures import Future

from mmdit.producer import rpc
from mmdit.producer.plan import (Cursor, MixtureVersion, PlanError, PlannedBatch, Planner, PlanSpec, SampleRef,
                                 Selection, validate_history)
from mmdit.producer.service_config import ServiceConfig

log = logging.getLogger("mmdit.coordinator")


# ----------------------------------------------------------------------------- the selection


def resolve_fingerprint(cache, wanted: str) -> str:
    """The encoder fingerprint to serve: `wanted`, or the only one in the cache."""
    found = cache.fingerprints()
    if not found:
        raise PlanError(f"cache {cache.path} is empty: fill it with `mmdit produce` first")
    if wanted:
        if wanted not in found:
            raise PlanError(f"fingerprint {wanted!r} not in cache {cache.path} (found {found})")
        return wanted
    if len(found) != 1:
        raise PlanError(f"cache {cache.path} holds fingerprints {found}: set service.fingerprint to pick one")
    return found[0]


def _record_meta(cache, key: str, fingerprint: str) -> dict:
    """task, source and condition shape of a cached record, from its segment header (no tensor read)."""
    meta = cache.meta(key, fingerprint)
    return {"task": meta["task"], "source": meta.get("source", ""), "cond_shape": meta.get("cond_shape")}


def _manifest_keys(cache_dir: Path, filters) -> set[str] | None:
    """Keys the manifest's thresholds select, or None when the cache has no manifest."""
    from mmdit.producer.manifest import read_manifest, select

    manifest_dir = cache_dir / "manifest"
    if not manifest_dir.is_dir():
        return None
    table = read_manifest(manifest_dir)
    if not table.num_rows:
        return None
    return set(select(table, filters).column("key").to_pylist())


def build_selection(cache, fingerprint: str, filters=None) -> tuple[Selection, dict]:
    """The samples to plan: every key cached under `fingerprint`, intersected with the manifest's
    selection when a manifest exists. Returns (selection, counts for the status report)."""
    allowed = _manifest_keys(Path(cache.path), filters) if filters is not None else None
    refs, counts = [], {"cached": 0, "filtered_out": 0}
    for bucket, keys in cache.buckets(fingerprint).items():
        for key in keys:
            counts["cached"] += 1
            if allowed is not None and key not in allowed:
                counts["filtered_out"] += 1
                continue
            meta = _record_meta(cache, key, fingerprint)
            cond = meta["cond_shape"]
            refs.append(SampleRef(key, tuple(bucket), meta["task"], meta["source"],
                                  (cond[1] * 8, cond[2] * 8) if cond else None))
    counts["selected"] = len(refs)
    return Selection(refs), counts


# ----------------------------------------------------------------------------- state


@dataclass
class _Entry:
    seq: int
    batch: PlannedBatch
    owner: str | None = None
    acked: set = field(default_factory=set)


@dataclass
class _Producer:
    name: str
    rank: int
    depth: int
    last_seen: float
    alive: bool = True
    owned: set = field(default_factory=set)
    held: set = field(default_factory=set)
    waiter: Future | None = None
    waiter_deadline: float = 0.0
    leased_total: int = 0


@dataclass
class _Consumer:
    name: str
    rank: int
    dp_rank: int
    last_seen: float
    acked: int = 0


class Coordinator:
    """The coordinator's state machine; thread-safe, no RPC inside (the RPC layer calls it).

    Methods that may have to wait return a `torch.futures.Future`; futures are completed after
    the lock is released.
    """

    def __init__(self, selection: Selection, svc: ServiceConfig, seed: int, dp_size: int, micro_batch_size: int,
                 history: list[MixtureVersion], clock=time.monotonic):
        validate_history(history)
        self.sel, self.svc, self.seed, self.clock = selection, svc, seed, clock
        self.lock = threading.RLock()
        self.producers: dict[str, _Producer] = {}
        self.consumers: dict[str, _Consumer] = {}
        self.counters = {"leases": 0, "acks": 0, "batches_done": 0, "revoked": 0, "handed_back": 0,
                         "producers_lost": 0, "producers_left": 0, "resets": 0}
        self.gen = -1
        self._reset(Cursor(), history, dp_size, micro_batch_size)

    # ---- plan generations

    def _spec(self, dp_size: int, micro_batch_size: int) -> PlanSpec:
        gbs = dp_size * micro_batch_size
        return PlanSpec(self.seed, gbs, min(gbs, self.svc.min_batch_size or dp_size), self.svc.drop_last)

    def _reset(self, cursor: Cursor, history: list[MixtureVersion], dp_size: int, mbs: int) -> list:
        """Start plan generation gen+1 at `cursor`; returns futures to complete."""
        spec = self._spec(dp_size, mbs)
        planner = Planner(spec, self.sel, history, cursor)  # raises before any state changes
        self.gen += 1
        self.spec, self.dp_size, self.micro_batch_size, self.history = spec, dp_size, mbs, history
        self.planner = planner
        self.entries: dict[int, _Entry] = {}
        self.pending: list[int] = []
        self.base = cursor.seq
        self.base_cursor = cursor
        done = []
        for p in self.producers.values():
            p.owned.clear()
            p.held.clear()
            done.append(self._release_waiter(p))
        for waiters in getattr(self, "locate_waiters", {}).values():
            done += [(f, {"status": "stale", "gen": self.gen}) for f, _, _ in waiters]
        self.locate_waiters: dict[int, list[tuple[Future, float, int]]] = {}
        self._plan_window()
        return [d for d in done if d]

    def _plan_window(self) -> None:
        while self.planner.seq < self.base + self.svc.plan_ahead:
            seq, batch = self.planner.next()
            self.entries[seq] = _Entry(seq, batch)
            heapq.heappush(self.pending, seq)

    # ---- producers

    def _reply(self, p: _Producer) -> dict:
        """Everything p owns but does not hold yet (leases), and all it may keep."""
        new = sorted(p.owned - p.held)
        return {"gen": self.gen, "dp_size": self.dp_size, "stop": False,
                "leases": [(seq, self.entries[seq].batch) for seq in new], "keep": sorted(p.owned)}

    def _release_waiter(self, p: _Producer):
        if p.waiter is None:
            return None
        fut, p.waiter = p.waiter, None
        return fut, self._reply(p)

    def _assign(self, p: _Producer) -> list[_Entry]:
        """At most one pending batch (the earliest) for p, if it has room."""
        if not p.alive or len(p.owned) >= p.depth:
            return []
        while self.pending:
            seq = heapq.heappop(self.pending)
            e = self.entries.get(seq)
            if e is None or e.owner is not None:
                continue
            e.owner = p.name
            p.owned.add(seq)
            p.leased_total += 1
            self.counters["leases"] += 1
            return [e]
        return []

    def lease(self, name: str, rank: int, depth: int, held: list) -> Future:
        """A producer's long poll. `held`: the (gen, seq) batches it holds. The reply comes at once
        when it owns batches it does not hold yet, else after `heartbeat_s` at the latest."""
        fut: Future = Future()
        with self.lock:
            now = self.clock()
            p = self.producers.get(name)
            if p is None or not p.alive:
                if p is not None:
                    log.warning("producer %s is back after being declared dead; it starts empty", name)
                p = self.producers[name] = _Producer(name, rank, depth, now)
                log.info("producer %s (rank %d) joined", name, rank)
            p.last_seen, p.depth = now, depth
            p.held = {seq for g, seq in held if g == self.gen}
            stale = self._release_waiter(p)  # a poll the producer gave up on
            done = self._wake_locators(self._assign(p))
            if p.owned - p.held or p.held - p.owned:
                done.append((fut, self._reply(p)))
            else:
                p.waiter, p.waiter_deadline = fut, now + self.svc.heartbeat_s
        _complete([stale] + done)
        return fut

    def producer_left(self, name: str) -> None:
        """A producer stopping on purpose: its leases go to the others at once."""
        self._lose(name, "left", lost=False)

    def producer_failed(self, name: str, reporter: str) -> None:
        """A client's fetch from `name` failed with a transport error: the producer is gone."""
        self._lose(name, f"unreachable from {reporter}")

    def _lose(self, name: str, why: str, lost: bool = True) -> None:
        with self.lock:
            p = self.producers.get(name)
            if p is None or not p.alive:
                return
            p.alive = False
            self.counters["producers_lost" if lost else "producers_left"] += 1
            for seq in p.owned:
                e = self.entries.get(seq)
                if e is not None and e.owner == name:
                    e.owner = None
                    heapq.heappush(self.pending, seq)
                    self.counters["revoked" if lost else "handed_back"] += 1
            (log.warning if lost else log.info)("producer %s %s (%s); %d leases go back to the queue", name,
                                                "lost" if lost else "left", why, len(p.owned))
            p.owned.clear()
            p.held.clear()
            done = [self._release_waiter(p)] + self._dispatch()
        _complete(done)

    def _dispatch(self) -> list:
        """Give pending batches to producers parked in a long poll, one at a time round-robin (so
        consecutive batches spread over producers), then answer every parked producer that has
        news: new leases, or batches to drop."""
        done = []
        parked = sorted((p for p in self.producers.values() if p.waiter is not None), key=lambda q: q.waiter_deadline)
        while self.pending and parked:
            parked = [p for p in parked if len(p.owned) < p.depth]
            for p in parked:
                done += self._wake_locators(self._assign(p))
        for p in self.producers.values():
            if p.waiter is not None and p.owned != p.held:
                done.append(self._release_waiter(p))
        return done

    # ---- consumers

    def register_consumer(self, name: str, rank: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                          cursor: dict | None, history: list[dict] | None) -> dict:
        cursor = Cursor.from_dict(cursor)
        theirs = [MixtureVersion.from_dict(v) for v in history or []]
        with self.lock:
            merged = self._merge_history(theirs, cursor)
            same = (cursor == self._consumer_cursor() and dp_size == self.dp_size
                    and micro_batch_size == self.micro_batch_size and merged == self.history)
            done = []
            if not same:
                log.info("consumer %s registers at %s (dp %d x %d): plan generation %d", name, cursor, dp_size,
                         micro_batch_size, self.gen + 1)
                done = self._reset(cursor, merged, dp_size, micro_batch_size)
                self.consumers = {}
                self.counters["resets"] += 1
            self.consumers[name] = _Consumer(name, rank, dp_rank, self.clock())
            reply = {"gen": self.gen, "cursor": cursor.to_dict(), "history": [v.to_dict() for v in self.history],
                     "selection": self.sel.digest(), "num_keys": len(self.sel),
                     "global_batch_size": self.spec.global_batch_size}
        _complete(done)
        return reply

    def _consumer_cursor(self) -> Cursor:
        """Where this generation's consumers stand (its start, until batches are done)."""
        return self.base_cursor if self.base == self.base_cursor.seq else Cursor(self.base, -1, -1)

    def _merge_history(self, theirs: list[MixtureVersion], cursor: Cursor) -> list[MixtureVersion]:
        """A checkpoint's history against ours: the longer when one extends the other; on conflict
        the checkpoint's (it made the batches already trained on) plus, when our current mixture
        differs from its last one, ours as a new version from the cursor on."""
        ours = list(self.history)
        if not theirs or theirs == ours[:len(theirs)]:
            return ours
        if ours == theirs[:len(ours)]:
            return theirs
        last, mine = theirs[-1], ours[-1]
        if (last.task_weights, last.source_weights) == (mine.task_weights, mine.source_weights):
            return theirs
        start = max((cursor.epoch, cursor.index), last.start)
        return theirs + [MixtureVersion(last.version + 1, start[0], start[1], mine.task_weights, mine.source_weights)]

    def locate(self, name: str, gen: int, seq: int, ahead: int = 0) -> Future:
        """Which producer holds batch `seq` (waits up to `heartbeat_s` for it to be leased), and
        where the next `ahead` batches are, when leased already (saves the client calls)."""
        fut: Future = Future()
        with self.lock:
            c = self.consumers.get(name)
            if c is not None:
                c.last_seen = self.clock()
            reply = self._where(gen, seq, ahead)
            if reply is None:
                self.locate_waiters.setdefault(seq, []).append((fut, self.clock() + self.svc.heartbeat_s, ahead))
        if reply is not None:
            fut.set_result(reply)
        return fut

    def _owner_of(self, seq: int) -> tuple | None:
        e = self.entries.get(seq)
        if e is None or e.owner is None:
            return None
        p = self.producers[e.owner]
        return (p.name, p.rank, (self.gen, seq))

    def _where(self, gen: int, seq: int, ahead: int = 0) -> dict | None:
        if gen != self.gen:
            return {"status": "stale", "gen": self.gen}
        if seq < self.base:
            return {"status": "done"}
        owner = self._owner_of(seq)
        if owner is None:
            return None
        later = {s: o for s in range(seq + 1, seq + 1 + ahead) if (o := self._owner_of(s)) is not None}
        return {"status": "ok", "owner": owner[0], "owner_rank": owner[1], "uid": owner[2], "ahead": later,
                "history_len": len(self.history)}

    def _wake_locators(self, entries: list[_Entry]) -> list:
        done = []
        for e in entries:
            for fut, _, ahead in self.locate_waiters.pop(e.seq, []):
                done.append((fut, self._where(self.gen, e.seq, ahead)))
        return done

    def ack(self, name: str, dp_rank: int, gen: int, seqs: list[int]) -> int:
        """DP rank `dp_rank` consumed batches `seqs`; returns how many acks counted."""
        counted = 0
        with self.lock:
            if gen != self.gen:
                return 0
            c = self.consumers.get(name)
            for seq in seqs:
                e = self.entries.get(seq)
                if e is None:
                    continue
                counted += 1
                e.acked.add(dp_rank)
                if len(e.acked) >= self.dp_size:
                    self._finish(e)
            self.counters["acks"] += counted
            if c is not None:
                c.last_seen, c.acked = self.clock(), c.acked + counted
            done = self._dispatch() if counted else []
        _complete(done)
        return counted

    def _finish(self, e: _Entry) -> None:
        """Batch e is done everywhere: forget it, tell its producer (at the next dispatch), plan on."""
        del self.entries[e.seq]
        self.counters["batches_done"] += 1
        if e.owner is not None:
            self.producers[e.owner].owned.discard(e.seq)
        while self.base not in self.entries and self.base < self.planner.seq:
            self.base += 1
        self._plan_window()

    def consumer_left(self, name: str) -> None:
        with self.lock:
            self.consumers.pop(name, None)

    # ---- mixture

    def update_mixture(self, task_weights: dict, source_weights: dict) -> dict:
        """Append a mixture version, in force from the first batch not yet planned."""
        with self.lock:
            start = self.planner.cursor
            last = self.history[-1]
            version = MixtureVersion(last.version + 1, start.epoch, start.index,
                                     {str(k): float(v) for k, v in task_weights.items()},
                                     {str(k): float(v) for k, v in source_weights.items()})
            candidate = self.history + [version]
            validate_history(candidate)
            self.history.append(version)  # the planner holds this list: it applies the version itself
            return version.to_dict()

    def history_dicts(self) -> list[dict]:
        with self.lock:
            return [v.to_dict() for v in self.history]

    # ---- time

    def reap(self) -> None:
        """Declare silent producers dead; answer long polls whose time is up."""
        now = self.clock()
        with self.lock:
            silent = [p.name for p in self.producers.values()
                      if p.alive and p.waiter is None and now - p.last_seen > self.svc.lease_timeout_s]
        for name in silent:
            self._lose(name, f"silent for {self.svc.lease_timeout_s:.0f}s")
        done = []
        with self.lock:
            for p in self.producers.values():
                if p.waiter is not None and now >= p.waiter_deadline:
                    done.append(self._release_waiter(p))
            for seq in list(self.locate_waiters):
                keep = []
                for fut, deadline, ahead in self.locate_waiters[seq]:
                    if now >= deadline:
                        done.append((fut, {"status": "waiting", "producers": self._alive_count()}))
                    else:
                        keep.append((fut, deadline, ahead))
                if keep:
                    self.locate_waiters[seq] = keep
                else:
                    del self.locate_waiters[seq]
        _complete(done)

    def _alive_count(self) -> int:
        return sum(p.alive for p in self.producers.values())

    def status(self) -> dict:
        with self.lock:
            return {
                "gen": self.gen, "base": self.base, "planned_to": self.planner.seq,
                "plan_cursor": self.planner.cursor.to_dict(), "dp_size": self.dp_size,
                "global_batch_size": self.spec.global_batch_size, "selected": len(self.sel),
                "selection": self.sel.digest(), "config_version": self.history[-1].version,
                "history": [v.to_dict() for v in self.history], "counters": dict(self.counters),
                "pending": len([s for s in self.pending if s in self.entries and self.entries[s].owner is None]),
                "producers": {p.name: {"rank": p.rank, "alive": p.alive, "held": len(p.owned),
                                       "leased_total": p.leased_total} for p in self.producers.values()},
                "consumers": {c.name: {"dp_rank": c.dp_rank, "acked": c.acked} for c in self.consumers.values()},
            }


def _complete(done: list) -> None:
    for item in done:
        if item is not None:
            fut, value = item
            if not fut.done():
                fut.set_result(value)


# ----------------------------------------------------------------------------- RPC entry points

_COORDINATOR: Coordinator | None = None


def _coordinator() -> Coordinator:
    if _COORDINATOR is None:
        raise RuntimeError("this process is not the coordinator")
    return _COORDINATOR


@async_execution
def rpc_lease(name: str, rank: int, depth: int, held: list) -> Future:
    return _coordinator().lease(name, rank, depth, held)


@async_execution
def rpc_locate(name: str, gen: int, seq: int, ahead: int = 0) -> Future:
    return _coordinator().locate(name, gen, seq, ahead)


def rpc_ack(name: str, dp_rank: int, gen: int, seqs: list[int]) -> int:
    return _coordinator().ack(name, dp_rank, gen, seqs)


def rpc_register_consumer(name, rank, dp_rank, dp_size, micro_batch_size, cursor, history) -> dict:
    return _coordinator().register_consumer(name, rank, dp_rank, dp_size, micro_batch_size, cursor, history)


def rpc_consumer_left(name: str) -> None:
    _coordinator().consumer_left(name)


def rpc_producer_left(name: str) -> None:
    _coordinator().producer_left(name)


def rpc_producer_failed(name: str, reporter: str) -> None:
    _coordinator().producer_failed(name, reporter)


def rpc_history() -> list[dict]:
    return _coordinator().history_dicts()


def rpc_update_mixture(task_weights: dict, source_weights: dict) -> dict:
    return _coordinator().update_mixture(task_weights, source_weights)


def rpc_status() -> dict:
    return _coordinator().status()


# ----------------------------------------------------------------------------- the service


class CoordinatorService:
    """The coordinator in this process: RPC rank 0, a reaper thread, and run.dir/service.json."""

    def __init__(self, cfg, run_dir: str | os.PathLike):
        from mmdit.producer.cache import LatentCache

        global _COORDINATOR
        svc = cfg.service
        cache = LatentCache(cfg.cache.dir)
        self.fingerprint = resolve_fingerprint(cache, svc.fingerprint)
        selection, self.selection_counts = build_selection(cache, self.fingerprint, cfg.data.filters)
        cache.close()
        history = [MixtureVersion(0, 0, 0, dict(cfg.data.task_weights), dict(cfg.data.source_weights))]
        self.coordinator = Coordinator(selection, svc, cfg.seed, svc.dp_size, cfg.train.micro_batch_size, history)
        self.status_path = Path(run_dir) / "service.json"
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        self.svc = svc
        _COORDINATOR = self.coordinator
        rpc.join(rpc.COORDINATOR, svc.host, svc.port, rank=0, rpc_timeout_s=svc.rpc_timeout_s,
                 join_timeout_s=svc.join_timeout_s, num_worker_threads=svc.rpc_threads)
        log.info("coordinator up on %s:%d: %d samples selected (%s), fingerprint %s", svc.host, svc.port,
                 len(selection), self.selection_counts, self.fingerprint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="coordinator-reaper", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        last_status = 0.0
        period = min(0.1, self.svc.heartbeat_s / 4)
        while not self._stop.wait(period):
            try:
                self.coordinator.reap()
                if time.monotonic() - last_status >= self.svc.status_every_s:
                    self.write_status()
                    last_status = time.monotonic()
            except Exception:  # noqa: BLE001 - the reaper must survive a bad status write
                log.exception("coordinator tick failed")

    def write_status(self) -> dict:
        status = {**self.coordinator.status(), "fingerprint": self.fingerprint,
                  "selection_counts": self.selection_counts, "time": time.time()}
        tmp = self.status_path.with_name(f".tmp-{self.status_path.name}")
        tmp.write_text(json.dumps(status, indent=1))
        os.replace(tmp, self.status_path)
        return status

    def alive_producers(self) -> list[str]:
        return [n for n, p in self.coordinator.status()["producers"].items() if p["alive"]]

    def stop(self) -> None:
        """Stop the reaper and leave RPC; the store host leaves last, so never gracefully."""
        global _COORDINATOR
        self._stop.set()
        self._thread.join(timeout=5)
        self.write_status()
        rpc.leave(graceful=False)
        _COORDINATOR = None

