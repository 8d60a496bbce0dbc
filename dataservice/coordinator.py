"""The coordinator: one per job; owns the batch plan, leases, acks, the cursor and the mixture history.

Protocol (every call is an RPC to the coordinator; messages in dataservice/protocol.py):
- a producer long-polls `lease(name, rank, depth, held)`: the reply (`Lease`) lists the batches it
  must prepare and `keep`, every batch it still holds; it drops the rest (acked, or revoked). The
  call is its heartbeat.
- a trainer client registers with its cursor and mixture history (`register_consumer`), then
  `locate`s a window of global batches in one call (the owners of those already leased), fetches
  its DP shard of each from its owner and acks it on arrival. Acks ride on the next locate; they
  go alone (`ack`) only after `Location.ack_hold_s` (up to a heartbeat while every planned batch
  has a producer, 0 while batches wait for a slot). A batch acked by every DP rank is done; its
  producer is told to drop it and gets new work in the same answer. So a DP rank costs the
  coordinator about one call per window or per heartbeat, not two per batch.
- a producer silent for `lease_timeout_s`, or reported dead by a client whose fetch failed with a
  transport error, loses its leases: they go back to the pending queue, and the next producer
  that asks gets them. Batches are pure functions of the plan, so a batch prepared twice is the
  same batch; the client consumes each `seq` exactly once.

Resets: a client that registers with a cursor, DP layout or history different from the
coordinator's starts a new plan *generation* from that cursor: everything planned before is
dropped (producers are told through `keep`), stale clients get `stale` answers.

Hot-swap (`update_data`, what `mmdit ctl set` calls): a change appends a data-config version
(dataservice/data_config.py) that takes effect at the first batch no producer holds yet: batches
planned but not leased are planned again under it, batches leased (maybe prepared, maybe
prefetched) keep their version. Its start (epoch, index) and first training step are recorded,
so a run replaying the history (from scratch or from a checkpoint) sees the same batches.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch.futures import Future

from mmdit.config.service import CoordinatorSettings, ServiceConfig
from mmdit.dataservice import protocol, rpc
from mmdit.dataservice.address import ServiceAddress, publish, withdraw
from mmdit.dataservice.plan import Cursor, DataVersion, PlannedBatch, Planner, PlanSpec, Selection, validate_history
from mmdit.dataservice.protocol import Lease, Location, Registration, ServiceDescription
from mmdit.dataservice.telemetry import CALL_KINDS, Telemetry, TimedLock

log = logging.getLogger("mmdit.coordinator")

ACK_HOLD_HEARTBEATS = 2.0
"""While every planned batch has a producer, a client may hold its acks this many heartbeats for
its next locate to carry (`Location.ack_hold_s`): they only advance the plan window then. When
batches wait for a free producer slot, the hold is 0 and acks go at once, as they free slots."""
IDLE_POLL_HEARTBEATS = 8
"""A producer that holds nothing is answered after this many heartbeats (at most half the lease
timeout) when no work comes: 1,024 idle producers then poll about 200 times a second, not 1,024."""


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
    """When its parked long poll is answered anyway: a heartbeat, longer when it holds nothing."""
    leased_total: int = 0
    can_encode: bool = False
    """It loaded encoders: it can serve samples that are not cached."""


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

    Liveness rule: *the leased batches always form a prefix of the plan's unfinished batches.*
    `leased_to` is the newest batch ever leased in this generation; a pending batch older than it
    (a gap: revoked from a producer that died, went silent or left) is leased to a live producer
    at once, beyond its `prepare_depth` if every producer is full (to the least loaded one first);
    `prepare_depth` only limits how far past `leased_to` the prefix grows. Producers prepare
    their batches oldest first, and clients ack a batch within a heartbeat of its arrival, at
    once (ack_interval_s) while a batch waits for a producer slot.

    Why this suffices: let s be the oldest batch some DP rank has not received yet. Every rank
    has received every batch before s and acks it within a heartbeat, so after that every batch
    a producer holds is s or newer.
    If s is pending and any batch newer than s is leased, s is a gap and is leased at once; if no
    batch newer than s is leased, producers hold nothing at all, so one has room. Either way s is
    leased within one heartbeat of a producer being alive (a parked long poll is answered at once,
    others poll within a heartbeat), prepared next, and served; a client waiting on an owner that
    hangs re-checks the lease every two heartbeats and follows it when it moves. So while one
    producer lives, the oldest needed batch is served within `lease_timeout_s` (to notice a silent
    owner) plus a few heartbeats and preparation times. tests/coordinator_sim.py checks this
    bound, and exactly-once delivery in plan order, over thousands of random schedules.
    """

    def __init__(self, selection: Selection, settings: CoordinatorSettings, seed: int, dp_size: int,
                 micro_batch_size: int, history: list[DataVersion], clock=time.monotonic,
                 stages: dict[int, str] | None = None, curriculum: list[dict] | None = None,
                 accumulation: int = 1, description: ServiceDescription | None = None):
        validate_history(history)
        self.sel, self.cfg, self.seed, self.clock = selection, settings, seed, clock
        self.description = description
        """What a trainer must agree with to join (protocol.JOIN_CHECKS); None: nothing checked."""
        self.stages = stages or {0: ""}
        """Curriculum stage (base resolution) -> cache fingerprint."""
        self.accumulation = accumulation
        """Global batches per optimizer step: training step S consumes seqs (S-1)*a .. S*a-1."""
        self.curriculum = sorted(((int(c["step"]), {k: v for k, v in c.items() if k != "step"})
                                  for c in curriculum or []), key=lambda c: c[0])
        self.telemetry = Telemetry()
        self.lock = TimedLock()
        self.calls: dict[str, int] = dict.fromkeys(CALL_KINDS, 0)
        """Calls answered, by kind (counted under the lock): the coordinator's own health."""
        self.producers: dict[str, _Producer] = {}
        self.parked: dict[str, _Producer] = {}  # producers whose long poll waits here
        self.news: set[str] = set()  # producers whose leases changed since their last answer
        self.alive = 0  # producers alive
        self.consumers: dict[str, _Consumer] = {}
        self.counters = {"leases": 0, "acks": 0, "batches_done": 0, "revoked": 0, "handed_back": 0,
                         "producers_lost": 0, "producers_left": 0, "resets": 0}
        self.gen, self.dp_size = -1, dp_size
        self.leased_to = self.old_frontier = -1
        self.ranks_of: dict[str, int] = {}  # consumer name -> DP rank, every incarnation
        self.latest: dict[int, str] = {}  # DP rank -> its latest consumer's name
        self.departed: set[int] = set()  # DP ranks whose latest consumer left
        self._needed_ranks: frozenset | None = None  # cache of _needed(), cleared when departed or dp_size change
        self.locate_waiters: dict[int, list[tuple[Future, float, int]]] = {}
        self._reset(Cursor(), history, dp_size, micro_batch_size)

    # ---- plan generations

    def _spec(self, dp_size: int, micro_batch_size: int) -> PlanSpec:
        gbs = dp_size * micro_batch_size
        return PlanSpec(self.seed, gbs, min(gbs, self.cfg.min_batch_size or dp_size), self.cfg.drop_last)

    def _reset(self, cursor: Cursor, history: list[DataVersion], dp_size: int, mbs: int) -> list:
        """Start plan generation gen+1 at `cursor`; returns futures to complete."""
        spec = self._spec(dp_size, mbs)
        planner = Planner(spec, self.sel, history, cursor)  # raises before any state changes
        self.gen += 1
        if dp_size != self.dp_size:
            self.departed = set()  # another layout: DP ranks are new
        self._needed_ranks = None
        self.spec, self.dp_size, self.micro_batch_size, self.history = spec, dp_size, mbs, history
        self.planner = planner
        self.entries: dict[int, _Entry] = {}
        self.pending: list[int] = []
        self.old_frontier = max(self.old_frontier, self.leased_to)  # what older generations leased
        self.leased_to = cursor.seq - 1
        self.joined_at: dict[int, int] = {}  # DP rank -> the cursor it registered at in this generation
        self.base = cursor.seq
        self.start = cursor
        self.positions: dict[int, tuple[int, int]] = {}  # seq -> the cursor position after batch seq - 1
        done = []
        for p in self.producers.values():
            p.owned.clear()
            p.held.clear()
            done.append(self._release_waiter(p))
        self.news = set()
        for waiters in self.locate_waiters.values():
            done += [(f, Location("stale", self.gen)) for f, _, _ in waiters]
        self.locate_waiters = {}
        self._plan_window()
        return [d for d in done if d]

    def _plan_window(self, at_least: int = 0) -> None:
        """Plan up to `plan_ahead` batches past the oldest one not done (and up to `at_least`)."""
        while self.planner.seq < max(self.base + self.cfg.plan_ahead, at_least):
            self._apply_curriculum(self.planner.seq)
            seq, batch = self.planner.next()
            self.entries[seq] = _Entry(seq, batch)
            self.positions[seq + 1] = (batch.epoch, batch.index + 1)
            heapq.heappush(self.pending, seq)

    # ---- producers

    def _reply(self, p: _Producer) -> Lease:
        """Everything p owns but does not hold yet (leases), and all it may keep."""
        new = sorted(p.owned - p.held)
        return Lease(self.gen, self.dp_size, [(seq, self.entries[seq].batch) for seq in new], sorted(p.owned))

    def _release_waiter(self, p: _Producer):
        if p.waiter is None:
            return None
        fut, p.waiter = p.waiter, None
        self.parked.pop(p.name, None)
        p.last_seen = max(p.last_seen, self.clock())  # it was connected while parked: silence counts from now
        return fut, self._reply(p)

    def _park(self, p: _Producer, fut: Future, now: float) -> None:
        """Hold p's long poll until it has news. One that holds nothing waits up to
        `IDLE_POLL_HEARTBEATS` heartbeats (bounded by half the lease timeout): idle producers
        then cost the coordinator a poll every few seconds instead of every heartbeat, and lose
        nothing: a parked poll is answered at once when work comes (`_dispatch`). One that holds
        batches is answered every heartbeat, so its silence is noticed within `lease_timeout_s`."""
        wait = self.cfg.heartbeat_s
        if not p.owned:
            wait = max(wait, min(IDLE_POLL_HEARTBEATS * wait, self.cfg.lease_timeout_s / 2, self.cfg.rpc_timeout_s))
        p.waiter, p.waiter_deadline = fut, now + wait
        self.parked[p.name] = p

    def _assign(self, p: _Producer) -> list[_Entry]:
        """At most one pending batch (the earliest) for p: if it has room, or, room or not, when
        the batch is a gap below `leased_to` (see the liveness rule in the class docstring)."""
        if not p.alive:
            return []
        while self.pending:
            seq = self.pending[0]
            e = self.entries.get(seq)
            if e is None or e.owner is not None:
                heapq.heappop(self.pending)
                continue
            if len(p.owned) >= p.depth and seq > self.leased_to:
                return []
            heapq.heappop(self.pending)
            e.owner = p.name
            p.owned.add(seq)
            self.news.add(p.name)
            p.leased_total += 1
            self.leased_to = max(self.leased_to, seq)
            self.counters["leases"] += 1
            return [e]
        return []

    def lease(self, name: str, rank: int, depth: int, held: list, can_encode: bool = False,
              counters: dict | None = None) -> Future:
        """A producer's long poll. `held`: the (gen, seq) batches it holds. The reply comes at once
        when it owns batches it does not hold yet, else after `heartbeat_s` at the latest."""
        fut: Future = Future()
        with self.lock:
            self.calls["lease"] += 1
            now = self.clock()
            p = self.producers.get(name)
            if p is None or not p.alive:
                if p is not None:
                    log.warning("producer %s is back after being declared dead; it starts empty", name)
                p = self.producers[name] = _Producer(name, rank, depth, now)
                self.alive += 1
                log.info("producer %s (rank %d) joined", name, rank)
            p.last_seen, p.depth, p.can_encode = now, depth, can_encode
            if counters:
                self.telemetry.producer_report(name, counters)
            p.held = {seq for g, seq in held if g == self.gen}
            stale = self._release_waiter(p)  # a poll the producer gave up on
            done = self._wake_locators(self._assign(p))
            if p.owned != p.held:
                done.append((fut, self._reply(p)))
            else:
                self._park(p, fut, now)
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
            self.alive -= 1
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
        """Give pending batches to producers parked in a long poll, each to the least loaded one
        (so consecutive batches spread over producers, and batches handed out beyond capacity
        spread evenly), then answer the parked producers whose leases changed: new leases, or
        batches to drop. Its cost follows what changed (`news`), not the number of producers or
        DP ranks, so acks can call it freely; the least-loaded choice is one pass over the parked
        producers per batch leased, once per global batch."""
        done = []
        while self.parked and self._next_pending() is not None:
            p = min(self.parked.values(), key=lambda q: (len(q.owned) / q.depth, q.waiter_deadline))
            assigned = self._assign(p)
            if not assigned:
                break  # the least loaded is full and the batch is no gap: every producer is full
            done += self._wake_locators(assigned)
        news, self.news = self.news, set()
        for name in news:
            p = self.parked.get(name)
            if p is not None and p.owned != p.held:
                done.append(self._release_waiter(p))
        return done

    def _next_pending(self) -> int | None:
        """The oldest planned batch no producer owns (stale queue entries dropped on the way)."""
        while self.pending:
            e = self.entries.get(self.pending[0])
            if e is not None and e.owner is None:
                return e.seq
            heapq.heappop(self.pending)
        return None

    # ---- consumers

    def describe(self) -> ServiceDescription | None:
        """Asked before registering: a trainer that does not match leaves without changing anything."""
        return self.description

    def register_consumer(self, name: str, rank: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                          cursor: dict | None, history: list[dict] | None) -> Registration:
        """A client joins at `cursor` (it consumed every batch before it). It joins the current
        generation when the layout and history agree and the cursor is a position of its plan
        not yet done everywhere; its acks of batches before the cursor are implied and its acks
        from the cursor on are forgotten (an earlier incarnation of the rank made them). Else a
        new generation starts at the cursor; clients of the old one get `stale` and register
        again at their own cursors."""
        cursor = Cursor.from_dict(cursor)
        theirs = [DataVersion.from_dict(v) for v in history or []]
        with self.lock:
            self.calls["register"] += 1
            merged = self._merge_history(theirs, cursor)
            joins = (dp_size == self.dp_size and micro_batch_size == self.micro_batch_size and merged == self.history
                     and self._on_plan(cursor))
            if joins:
                for e in list(self.entries.values()):
                    if e.seq < cursor.seq:
                        self._acked(e, dp_rank)
                    else:
                        e.acked.discard(dp_rank)
                done = self._dispatch()
            else:
                log.info("consumer %s registers at %s (dp %d x %d): plan generation %d", name, cursor, dp_size,
                         micro_batch_size, self.gen + 1)
                done = self._reset(cursor, merged, dp_size, micro_batch_size)
                self.consumers = {}
                self.counters["resets"] += 1
            for other in [c.name for c in self.consumers.values() if c.dp_rank == dp_rank]:
                del self.consumers[other]  # an earlier incarnation of this rank: its late acks are void
            self.consumers[name] = _Consumer(name, rank, dp_rank, self.clock())
            self.joined_at[dp_rank] = cursor.seq
            self.ranks_of[name], self.latest[dp_rank] = dp_rank, name
            if dp_rank in self.departed:
                self.departed.discard(dp_rank)
                self._needed_ranks = None
            reply = Registration(self.gen, cursor.to_dict(), [v.to_dict() for v in self.history], self.sel.digest(),
                                 len(self.sel), self.spec.global_batch_size)
        _complete(done)
        return reply

    def _on_plan(self, cursor: Cursor) -> bool:
        """Is `cursor` a position of this generation's plan from which nothing is done yet?
        (Acks come on receipt, so batches beyond `base` may be done already.)"""
        if cursor.seq < self.base:
            return False
        self._plan_window(at_least=cursor.seq)  # ranks may be further apart than the window
        if any(seq not in self.entries for seq in range(cursor.seq, self.planner.seq)):
            return False
        if cursor.seq == self.start.seq:
            return cursor == self.start
        return self.positions.get(cursor.seq) == (cursor.epoch, cursor.index)

    def _merge_history(self, theirs: list[DataVersion], cursor: Cursor) -> list[DataVersion]:
        """A checkpoint's history against ours: the longer when one extends the other; on conflict
        the checkpoint's (it made the batches already trained on) plus, when our current config
        differs from its last one, ours as a new version from the cursor on."""
        ours = list(self.history)
        if not theirs or theirs == ours[:len(theirs)]:
            return ours
        if ours == theirs[:len(ours)]:
            return theirs
        last, mine = theirs[-1], ours[-1]
        if last.same_plan(mine):
            return theirs
        start = max((cursor.epoch, cursor.index), last.start)
        return theirs + [replace(mine, version=last.version + 1, epoch=start[0], index=start[1],
                                 from_step=self.step_of(cursor.seq),
                                 why="the service's config differs from the checkpoint's")]

    def locate(self, name: str, gen: int, seq: int, ahead: int = 0, acks: list[int] | None = None,
               report: dict | None = None) -> Future:
        """Which producer holds batch `seq` (waits up to `heartbeat_s` for it to be leased), and
        where the next `ahead` batches are, when leased already: a client locates a window of
        batches in one call. `acks` and `report` are what `ack` takes, carried by the same call
        (counted first, so a batch they finish frees its producer before the answer)."""
        fut: Future = Future()
        if report:
            self.telemetry.trainer_report(self.ranks_of.get(name, -1), report)
        with self.lock:
            self.calls["locate"] += 1
            done = self._count_acks(name, gen, acks) if acks else []
            c = self.consumers.get(name)
            if c is not None:
                c.last_seen = self.clock()
            reply = self._where(gen, seq, ahead)
            if reply is None:
                self.locate_waiters.setdefault(seq, []).append((fut, self.clock() + self.cfg.heartbeat_s, ahead))
        _complete(done)
        if reply is not None:
            fut.set_result(reply)
        return fut

    def _owner_of(self, seq: int) -> tuple | None:
        e = self.entries.get(seq)
        if e is None or e.owner is None:
            return None
        p = self.producers[e.owner]
        return (p.name, p.rank, (self.gen, seq))

    def _where(self, gen: int, seq: int, ahead: int = 0) -> Location | None:
        if gen != self.gen:
            return Location("stale", self.gen)
        if seq < self.base:
            return Location("done", self.gen)
        owner = self._owner_of(seq)
        if owner is None:
            return None
        ahead = min(ahead, self.cfg.plan_ahead)  # nothing further is planned
        later = {s: o for s in range(seq + 1, seq + 1 + ahead) if (o := self._owner_of(s)) is not None}
        hold = 0.0 if self._next_pending() is not None else ACK_HOLD_HEARTBEATS * self.cfg.heartbeat_s
        return Location("ok", self.gen, owner[0], owner[1], owner[2], later, len(self.history), self.alive, hold)

    def _wake_locators(self, entries: list[_Entry]) -> list:
        done = []
        for e in entries:
            for fut, _, ahead in self.locate_waiters.pop(e.seq, []):
                done.append((fut, self._where(self.gen, e.seq, ahead)))
        return done

    def ack(self, name: str, dp_rank: int, gen: int, seqs: list[int], report: dict | None = None) -> int:
        """DP rank `dp_rank` received batches `seqs`; returns how many acks counted. `report`: the
        figures of its last step (dataservice/telemetry.py), whatever the generation."""
        if report:
            self.telemetry.trainer_report(dp_rank, report)
        with self.lock:
            self.calls["ack"] += 1
            before = self.counters["acks"]
            done = self._count_acks(name, gen, seqs)
            counted = self.counters["acks"] - before
        _complete(done)
        return counted

    def _count_acks(self, name: str, gen: int, seqs: list[int]) -> list:
        """Count `name`'s acks of `seqs` (under the lock); returns futures to complete."""
        c = self.consumers.get(name)
        if gen != self.gen or c is None:  # an older generation, or a rank's earlier incarnation
            return []
        counted = 0
        for seq in seqs:
            e = self.entries.get(seq)
            if e is not None:
                counted += 1
                self._acked(e, c.dp_rank)
        self.counters["acks"] += counted
        c.last_seen, c.acked = self.clock(), c.acked + counted
        return self._dispatch() if counted else []

    def _needed(self) -> frozenset[int]:
        """DP ranks whose acks a batch waits for: all but those whose client left."""
        if self._needed_ranks is None:
            self._needed_ranks = frozenset(range(self.dp_size)) - self.departed
        return self._needed_ranks

    def _acked(self, e: _Entry, dp_rank: int) -> None:
        e.acked.add(dp_rank)
        needed = self._needed()
        if len(e.acked) >= len(needed) and needed <= e.acked:  # the subset test runs about once per batch
            self._finish(e)

    def _finish(self, e: _Entry) -> None:
        """Batch e is done everywhere: forget it, tell its producer (at the next dispatch), plan on."""
        del self.entries[e.seq]
        self.counters["batches_done"] += 1
        if e.owner is not None:
            self.producers[e.owner].owned.discard(e.seq)
            self.news.add(e.owner)
        while self.base not in self.entries and self.base < self.planner.seq:
            self.positions.pop(self.base, None)
            self.base += 1
        self._plan_window()

    def consumer_left(self, name: str) -> None:
        """A client closed (its run is over, or it stops on purpose): batches no longer wait for
        its acks. Should that DP rank register again from an earlier cursor, the plan restarts
        there (a new generation) and nothing is lost."""
        with self.lock:
            self.consumers.pop(name, None)
            dp_rank = self.ranks_of.get(name)
            if dp_rank is None or self.latest.get(dp_rank) != name:
                return
            self.departed.add(dp_rank)
            self._needed_ranks = None
            for e in list(self.entries.values()):
                if self._needed() <= e.acked:
                    self._finish(e)
            done = self._dispatch()
        _complete(done)

    # ---- the data config

    def update_data(self, changes: dict, why: str = "") -> dict:
        """Apply a data-config change (dataservice/data_config.py) from the first batch no
        producer holds yet. Raises ChangeError (nothing changed) when the change is invalid or
        would select no sample. Concurrent changes are serialized by the lock."""
        from mmdit.dataservice.data_config import ChangeError, apply_changes

        with self.lock:
            last = self.history[-1]
            candidate, applied = apply_changes(last, changes, set(self.stages), buckets=set(self.sel.bucket_names))
            encoders = any(p.alive and p.can_encode for p in self.producers.values())
            candidate = replace(candidate, encode_missing=encoders)
            if candidate.task_weights and not any(w > 0 for w in candidate.task_weights.values()):
                raise ChangeError("every task weight would be 0")
            weights = self.sel.weights(candidate)
            if weights.sum() <= 0:
                raise ChangeError(f"the change selects no sample ({', '.join(f'{k}={v}' for k, v in applied.items())})")
            # the first batch nobody holds: no producer leased it, no rank consumed it (a rank that
            # joined this generation at a later cursor consumed everything before that cursor; a
            # rank yet to rejoin after a reset may hold anything the old generations leased)
            seq = max([self.leased_to + 1, *self.joined_at.values()])
            if set(self.joined_at) | self.departed != set(range(self.dp_size)):
                seq = max(seq, self.old_frontier + 1)
            self._plan_window(at_least=seq)
            epoch, index = (self.start.epoch, self.start.index) if seq == self.start.seq else self.positions[seq]
            version = replace(candidate, version=last.version + 1, epoch=epoch, index=index, time=time.time(),
                              from_step=self.step_of(seq), why=why, changes=applied)
            # Versions starting later than this one were planned in a timeline a restart from an
            # earlier checkpoint abandoned; this change (made on top of them) replaces them.
            history = [v for v in self.history if v.start <= version.start] + [version]
            validate_history(history)
            self._replan_from(seq, Cursor(seq, epoch, index), history)
            drawn = weights > 0
            missing = int((drawn & ~self.sel.cached).sum())
            log.info("data config version %d from step %d (%s): %s", version.version, version.from_step,
                     why or "no reason given", applied)
            return {"config_version": version.version, "from_step": version.from_step, "changes": applied,
                    "selected": int(drawn.sum()), "missing": missing,
                    "missing_planned": missing if encoders else 0}

    def step_of(self, seq: int) -> int:
        """The training step (from 1) that consumes global batch `seq`."""
        return seq // self.accumulation + 1

    def _apply_curriculum(self, seq: int) -> None:
        """Before planning `seq`: the curriculum's change for the step that begins there, unless
        the history has it already (a resumed run replays it from its checkpoint)."""
        for step, changes in self.curriculum:
            if (step - 1) * self.accumulation != seq:
                continue
            why = f"curriculum: step {step}"
            if any(v.why == why for v in self.history):
                return
            from mmdit.dataservice.data_config import apply_changes

            version, applied = apply_changes(self.history[-1], changes, set(self.stages))
            cursor = self.planner.cursor
            self.history.append(replace(version, version=self.history[-1].version + 1, epoch=cursor.epoch,
                                        index=cursor.index, time=time.time(), from_step=step, why=why,
                                        changes=applied))  # the planner holds this list: it applies it
            log.info("data config version %d from step %d (%s): %s", self.history[-1].version, step, why, applied)

    def _replan_from(self, seq: int, cursor: Cursor, history: list[DataVersion]) -> None:
        """Forget planned batches from `seq` on (none is leased) and plan them under `history`."""
        self.planner = Planner(self.spec, self.sel, history, cursor)
        self.history = history
        for s in [s for s in self.entries if s >= seq]:
            del self.entries[s]
            self.positions.pop(s + 1, None)
        self._plan_window()

    def history_dicts(self) -> list[dict]:
        with self.lock:
            return [v.to_dict() for v in self.history]

    def history_versions(self) -> list[DataVersion]:
        with self.lock:
            return list(self.history)

    # ---- time

    def reap(self) -> None:
        """Declare silent producers dead; answer long polls whose time is up."""
        now = self.clock()
        with self.lock:
            silent = [p.name for p in self.producers.values()
                      if p.alive and p.waiter is None and now - p.last_seen > self.cfg.lease_timeout_s]
        for name in silent:
            self._lose(name, f"silent for {self.cfg.lease_timeout_s:.0f}s")
        done = []
        with self.lock:
            for p in [p for p in self.parked.values() if now >= p.waiter_deadline]:
                done.append(self._release_waiter(p))
            for seq in list(self.locate_waiters):
                keep = []
                for fut, deadline, ahead in self.locate_waiters[seq]:
                    if now >= deadline:
                        done.append((fut, Location("waiting", self.gen, producers_alive=self.alive)))
                    else:
                        keep.append((fut, deadline, ahead))
                if keep:
                    self.locate_waiters[seq] = keep
                else:
                    del self.locate_waiters[seq]
        _complete(done)

    def health(self) -> dict:
        """The coordinator's own load (telemetry.health_point turns two into rates): calls by kind,
        lock time, queues, batches done, and its process's CPU time, all totals."""
        with self.lock:
            return {"time": time.monotonic(), "cpu_s": time.process_time(), "calls": dict(self.calls),
                    "batches_done": self.counters["batches_done"], "lock_held_s": self.lock.held_s,
                    "lock_wait_s": self.lock.wait_s, "pending": self._pending_count(),
                    "parked_producers": len(self.parked),
                    "parked_locates": sum(len(w) for w in self.locate_waiters.values())}

    def _pending_count(self) -> int:
        return sum(1 for s in self.pending if (e := self.entries.get(s)) is not None and e.owner is None)

    def status(self) -> dict:
        with self.lock:
            return {
                "gen": self.gen, "base": self.base, "planned_to": self.planner.seq,
                "plan_cursor": self.planner.cursor.to_dict(), "dp_size": self.dp_size,
                "global_batch_size": self.spec.global_batch_size, "selected": len(self.sel),
                "selection": self.sel.digest(), "config_version": self.history[-1].version,
                "history": [v.to_dict() for v in self.history], "counters": dict(self.counters),
                "pending": self._pending_count(),
                "producers": {p.name: {"rank": p.rank, "alive": p.alive, "held": len(p.owned), "seqs": sorted(p.owned),
                                       "leased_total": p.leased_total} for p in self.producers.values()},
                "consumers": {c.name: {"dp_rank": c.dp_rank, "acked": c.acked, "last_seen": c.last_seen}
                              for c in self.consumers.values()},
            }


def _listed_members() -> list[str]:
    """The RPC group's member list ("name-rank"), as the next joiner reads it; [] once it left."""
    try:
        return rpc.listed_members()
    except Exception:  # noqa: BLE001 - stopping: the agent is gone
        return []


def _complete(done: list) -> None:
    for item in done:
        if item is not None:
            fut, value = item
            if not fut.done():
                fut.set_result(value)


# ----------------------------------------------------------------------------- the service


def service_description(cache, stages: dict[int, str], stage: int, selection: Selection, data_cfg,
                        dp_size: int) -> ServiceDescription:
    """What a trainer must agree with to join (protocol.JOIN_CHECKS): the shapes of one cached
    record (the served stage's first readable one), the latent sides of every bucket the plan may
    draw, and the job's resolution schedule."""
    from mmdit.cache import VAE_SCALE

    record = next((r for fp in [stages[stage], *stages.values()] if (r := _first_record(cache, fp)) is not None),
                  None)
    # every target and condition image of every group the plan draws from, cached or not
    sides = {side // VAE_SCALE for _, bucket, _, cond in selection.groups for side in (*bucket, *cond) if side}
    return ServiceDescription(
        fingerprints=sorted(set(stages.values())),
        latent_channels=None if record is None else int(record["latents"].shape[0]),
        latent_side_multiple=math.gcd(*sides) or None,
        text_width=None if record is None else int(record["prompt_embeds"].shape[1]),
        base_resolution=stage or None,
        stage_weights={str(k): float(v) for k, v in data_cfg.stage_weights.items()},
        curriculum=list(data_cfg.curriculum),
        dp_size=dp_size,
    )


def _first_record(cache, fingerprint: str, tries: int = 8) -> dict | None:
    """One readable record under `fingerprint` (damaged ones are skipped), or None."""
    for key in cache.keys(fingerprint)[:tries]:
        try:
            return cache.read(key, fingerprint)
        except (KeyError, ValueError):  # DamagedRecord is a ValueError
            continue
    return None


class CoordinatorService:
    """The coordinator in this process: RPC rank 0, a reaper thread, and run.dir/service.json."""

    def __init__(self, cfg, run_dir):
        from mmdit.cache import LatentCache
        from mmdit.dataservice.data_config import ChangeError, apply_changes, version_zero
        from mmdit.dataservice.plan import PlanError
        from mmdit.dataservice.selection import build_selection, resolve_fingerprint, resolve_stages

        svc: ServiceConfig = cfg.service
        self.settings = settings = svc.role(CoordinatorSettings)
        cache = LatentCache(cfg.cache.dir)
        self.fingerprint = resolve_fingerprint(cache, settings.fingerprint)
        stages = resolve_stages(cache, self.fingerprint)
        stage = cfg.data.base_resolution if cfg.data.base_resolution in stages else min(stages)
        selection, self.selection_counts = build_selection(cache, stages, cfg.data.filters, stage,
                                                           cfg.data.eval_fraction)
        self.description = service_description(cache, stages, stage, selection, cfg.data, svc.dp_size)
        cache.close()
        history = [version_zero(cfg.data, stage)]
        if history[0].stage_weights:  # every stage drawn must be cached
            try:
                apply_changes(history[0], {"stage_weights": history[0].stage_weights}, set(stages))
            except ChangeError as e:
                raise PlanError(f"data.{e}") from None
        for entry in cfg.data.curriculum:  # reject a curriculum the cache cannot serve, before anything runs
            try:
                apply_changes(history[0], {k: v for k, v in entry.items() if k != "step"}, set(stages))
            except ChangeError as e:
                raise PlanError(f"data.curriculum step {entry['step']}: {e}") from None
        per_round = cfg.train.micro_batch_size * svc.dp_size
        self.coordinator = Coordinator(selection, settings, cfg.seed, svc.dp_size, cfg.train.micro_batch_size, history,
                                       stages=stages, curriculum=cfg.data.curriculum,
                                       accumulation=max(1, cfg.train.global_batch_size // per_round),
                                       description=self.description)
        self.status_path = Path(run_dir) / "service.json"
        self.status_path.parent.mkdir(parents=True, exist_ok=True)
        protocol.serve(protocol.COORDINATOR, self.coordinator)
        service_id = uuid.uuid4().hex
        try:
            rpc.join(rpc.COORDINATOR, settings.host, settings.port, rank=0, service_id=service_id,
                     advertise_host=settings.advertise_host, rpc_timeout_s=settings.rpc_timeout_s,
                     join_timeout_s=settings.join_timeout_s, num_worker_threads=settings.rpc_threads)
        except BaseException:
            protocol.stop_serving(protocol.COORDINATOR)
            raise
        # where the store listens: service.advertise_host, else service.host (as an address)
        self.address = ServiceAddress(rpc.hosted_address(), rpc.hosted_port(), service_id)
        from mmdit.dataservice import dashboard
        from mmdit.dataservice.control import ControlServer

        self.run_dir = Path(run_dir)
        self.control = ControlServer(self.coordinator, settings.control_host or self.address.host,
                                     settings.control_port, run_dir)
        dashboard.install(self.control, self.coordinator, self.coordinator.telemetry, run_dir)
        self.dashboard_url = f"{self.control.url}/dashboard"
        log.info("coordinator up on %s: %d samples in the universe (%s), fingerprint %s", self.address,
                 len(selection), self.selection_counts, self.fingerprint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="coordinator-reaper", daemon=True)
        self._thread.start()
        self.address_path = publish(run_dir, self.address, self.control.url)  # last: the service is up

    def _tick(self) -> None:
        last_status = 0.0
        period = min(0.1, self.settings.heartbeat_s / 4)
        while not self._stop.wait(period):
            try:
                self.coordinator.reap()
                if time.monotonic() - last_status >= self.settings.status_every_s:
                    status = self.write_status()
                    self.coordinator.telemetry.tick(sum(p["alive"] for p in status["producers"].values()),
                                                    self.coordinator.health())
                    last_status = time.monotonic()
            except Exception:  # noqa: BLE001 - the reaper must survive a bad status write
                log.exception("coordinator tick failed")

    def write_status(self) -> dict:
        from mmdit.utils.atomic import atomic_write_json

        status = {**self.coordinator.status(), "fingerprint": self.fingerprint,
                  "selection_counts": self.selection_counts, "description": asdict(self.description),
                  "rpc_members": _listed_members(), "time": time.time()}
        atomic_write_json(self.status_path, status, fsync=False)
        return status

    def alive_producers(self) -> list[str]:
        return [n for n, p in self.coordinator.status()["producers"].items() if p["alive"]]

    def stop(self) -> None:
        """Stop the reaper and leave RPC; the store host leaves last, so never gracefully."""
        self._stop.set()
        self._thread.join(timeout=5)
        withdraw(self.run_dir, self.address.service_id)  # first: no new client finds a stopping service
        self.write_status()
        self.control.close()
        rpc.leave(graceful=False)
        protocol.stop_serving(protocol.COORDINATOR)
