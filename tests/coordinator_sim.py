"""A seeded, discrete-time simulation of the data service around the real coordinator.

The `Coordinator` state machine (dataservice/coordinator.py) runs unchanged on a fake clock;
producers and DP-rank clients are small models of dataservice/server.py and client.py that call
it the way the real ones do over RPC (a long-polled `lease`, `locate`, `ack`, failure reports).
Clients speak one of two protocols, drawn per schedule: `windowed` (client.py now: one `locate`
names the owners of a window of batches, which the client fetches from without asking again;
acks ride on the next locate, or go alone once they waited the `ack_hold_s` the coordinator
allows) or `per_batch` (the protocol before: a locate per batch, acks after a random delay).
A schedule, drawn from one seed, sets the sizes (DP ranks, micro-batch, samples, buckets,
prepare_depth, plan_ahead, prefetch, timeouts), the speed of every rank (late starts, slow or
paused steps) and a stream of faults: producers killed (with or without a client noticing),
going silent and coming back, leaving, joining late, and the whole trainer restarting from a
checkpoint cursor, and data-config changes (hot-swaps) while windows are located and acks held.
A crashed incarnation's acks can arrive late (a call still in flight, or acks it held): after its
successor registered, they must count for nothing, or a batch finishes before the successor has it.

Invariants, checked at every tick:
- exactly once, in plan order: the batch a rank consumes at position `seq` is the pure plan's
  batch `seq` (same keys, bucket, version), and every rank gets every batch of the run;
- liveness: while a producer is up, the oldest batch that some rank still needs reaches it
  within `lease_timeout_s + 3 heartbeats + 3 preparation times` of becoming the oldest, or of
  the last failure of a producer that owned it (a dead or silent owner costs one lease timeout;
  revoking, re-leasing, preparing and a client's re-check cost the rest).

Run many schedules: `python tests/coordinator_sim.py --schedules 100000 [--seed S]`.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import random
import sys
import time
from dataclasses import dataclass

from mmdit.config.service import CoordinatorSettings
from mmdit.dataservice.coordinator import Coordinator
from mmdit.dataservice.plan import Cursor, DataVersion, PlanError, Planner, PlanSpec, SampleRef, Selection

TICK = 0.25
WINDOW = 6  # batches a windowed client locates at once (client.LOCATE_WINDOW, small for tiny plans)
BUCKETS = [(256, 256), (256, 512), (512, 256)]


class SimFailure(AssertionError):
    pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Slot:
    batch: object
    ready: bool = False


class Producer:
    """A producer server: long-polls `lease`, prepares held batches earliest first, serves them."""

    def __init__(self, sim: Sim, name: str, rank: int, prep_s: float):
        self.sim, self.name, self.rank, self.prep_s = sim, name, rank, prep_s
        self.state = "up"  # up | silent | dead | gone (left on purpose)
        self.held: dict[tuple[int, int], Slot] = {}
        self.queue: list[tuple[int, tuple[int, int]]] = []
        self.preparing: tuple[int, int] | None = None
        self.busy_until = 0.0
        self.poll = None

    def step(self) -> None:
        if self.state != "up":
            return
        now = self.sim.clock.now
        if self.preparing is not None and now >= self.busy_until:
            slot = self.held.get(self.preparing)
            if slot is not None:
                slot.ready = True
            self.preparing = None
        while self.preparing is None and self.queue:
            _, uid = heapq.heappop(self.queue)
            if uid in self.held and not self.held[uid].ready:
                self.preparing, self.busy_until = uid, now + self.prep_s
        for _ in range(3):  # the real loop re-polls as soon as a reply arrives
            if self.poll is None:
                self.poll = self.sim.coord.lease(self.name, self.rank, self.sim.depth, sorted(self.held))
            if not self.poll.done():
                break
            self.apply(self.poll.value())
            self.poll = None

    def apply(self, reply) -> None:
        keep = {(reply.gen, s) for s in reply.keep}
        for uid in [u for u in self.held if u not in keep]:
            del self.held[uid]
        for seq, batch in reply.new:
            uid = (reply.gen, seq)
            if uid in keep and uid not in self.held:
                self.held[uid] = Slot(batch)
                heapq.heappush(self.queue, (seq, uid))


@dataclass
class Fetch:
    phase: str = "locate"  # locate | locating | fetching | have
    fut: object = None
    owner: str = ""
    uid: tuple = ()
    recheck_at: float = 0.0
    recheck: object = None
    batch: object = None


class Consumer:
    """One DP rank's client: `prefetch` batches located and fetched ahead, consumed in order."""

    def __init__(self, sim: Sim, dp_rank: int, start_at: float, step_s: float, incarnation: int = 0):
        self.sim, self.dp_rank, self.start_at, self.step_s = sim, dp_rank, start_at, step_s
        self.name = f"trainer_{dp_rank}_{incarnation}"
        self.cursor, self.gen = 0, -1
        self.cursor_pos = Cursor()
        self.busy_until = 0.0
        self.fetches: dict[int, Fetch] = {}
        self.acks: list[tuple[float, int]] = []
        self.registered, self.left = False, False
        self.registered_at: float | None = None
        self.waiting_since: float | None = None
        self.counted_since: float | None = None
        self.windowed = sim.windowed
        self.located: dict[int, tuple[str, tuple]] = {}  # seq -> (owner, uid), from a window
        self.held_acks: list[tuple[float, int]] = []  # windowed: (queued at, seq), not sent yet
        self.hold = 0.0  # the last Location's ack_hold_s

    @property
    def done(self) -> bool:
        return self.cursor >= self.sim.target

    def register(self) -> None:
        """(Re-)join at the cursor: after a plan generation change, prefetched batches and their
        acks belong to the old generation and are dropped."""
        self.fetches, self.acks, self.located, self.held_acks = {}, [], {}, []
        reply = self.sim.coord.register_consumer(self.name, 100 + self.dp_rank, self.dp_rank, self.sim.dp, self.sim.mbs,
                                                 self.cursor_pos.to_dict(), None)
        self.gen = reply.gen
        if reply.cursor["seq"] != self.cursor:
            raise SimFailure(f"{self.name}: registered at {self.cursor}, coordinator says {reply.cursor}")
        self.registered, self.registered_at = True, self.sim.clock.now

    def step(self) -> None:
        sim, now = self.sim, self.sim.clock.now
        if now < self.start_at:
            return
        if not self.registered:
            self.register()
            sim.deliver_late_acks()  # a predecessor's call may arrive right after this registration
        due = [s for t, s in self.acks if t <= now]
        if due:
            self.acks = [(t, s) for t, s in self.acks if t > now]
            sim.coord.ack(self.name, self.dp_rank, self.gen, due)
        if self.held_acks and now - self.held_acks[0][0] >= self.hold:  # no locate carried them in time
            sim.coord.ack(self.name, self.dp_rank, self.gen, self.take_acks())
        if any(f.phase == "stale" for f in self.fetches.values()):
            self.register()
        if self.done:
            if not self.acks and not self.held_acks and not self.left:  # the client closes at the end of its run
                sim.coord.consumer_left(self.name)
                self.left = True
            return
        for seq in range(self.cursor, min(self.cursor + sim.prefetch, sim.target)):
            self.advance(seq, self.fetches.setdefault(seq, Fetch()))
        if now < self.busy_until:
            return
        f = self.fetches.get(self.cursor)
        if f is None or f.phase != "have":
            if self.waiting_since is None:
                self.waiting_since = now
            return
        self.waiting_since = None
        sim.deliver(self, self.cursor, f.batch)
        del self.fetches[self.cursor]
        self.cursor += 1
        self.cursor_pos = Cursor(self.cursor, f.batch.epoch, f.batch.index + 1)
        step = self.step_s * sim.rng.random() + (sim.rng.uniform(0, 8) if sim.rng.random() < 0.02 else 0.0)
        self.busy_until = now + step

    def take_acks(self) -> list[int]:
        acks, self.held_acks = [s for _, s in self.held_acks], []
        return acks

    def locate(self, seq: int):
        """A locate call: per_batch asks for one batch; windowed for a window, carrying its acks."""
        if not self.windowed:
            return self.sim.coord.locate(self.name, self.gen, seq, 0)
        return self.sim.coord.locate(self.name, self.gen, seq, WINDOW - 1, self.take_acks())

    def learn(self, loc) -> None:
        """A windowed client keeps the owners of the window's later batches."""
        self.hold = loc.ack_hold_s
        for s, (owner, _, uid) in loc.ahead.items():
            if s >= self.cursor:
                self.located[s] = (owner, uid)

    def advance(self, seq: int, f: Fetch) -> None:
        sim, now = self.sim, self.sim.clock.now
        for _ in range(3):
            if f.phase == "locate" and seq in self.located:  # told by an earlier window: no call
                (f.owner, f.uid), f.recheck_at, f.recheck = self.located.pop(seq), now, None
                f.phase = "fetching"
            if f.phase == "locate":
                f.fut, f.phase = self.locate(seq), "locating"
            if f.phase == "locating":
                if not f.fut.done():
                    return
                loc = f.fut.value()
                if self.windowed and loc.status in ("ok", "waiting"):
                    self.learn(loc)
                if loc.status == "done":
                    raise SimFailure(f"{self.name}: locate({seq}) answered done before this rank had it")
                if loc.status == "stale":
                    f.phase = "stale"
                    return
                if loc.status == "waiting":
                    f.phase = "locate"
                    return
                f.phase, f.owner, f.uid, f.recheck_at, f.recheck = "fetching", loc.owner, loc.uid, now, None
            if f.phase == "fetching":
                p = sim.producers[f.owner]
                if p.state in ("dead", "gone"):  # a transport error: report it, ask again
                    sim.coord.producer_failed(p.name, self.name)
                    self.located = {s: o for s, o in self.located.items() if o[0] != p.name}
                    f.phase = "locate"
                    continue
                if p.state == "up":
                    slot = p.held.get(f.uid)
                    if slot is None:  # not_held: the lease moved
                        f.phase = "locate"
                        continue
                    if slot.ready:  # received: acked (the client keeps it until consumed)
                        f.phase, f.batch = "have", slot.batch
                        if self.windowed:
                            self.held_acks.append((now, seq))
                        else:
                            self.acks.append((now + sim.rng.choice((0.0, 0.0, TICK, 2 * TICK)), seq))
                        return
                # still preparing, or the owner hangs: re-check the lease every two heartbeats
                if f.recheck is None and now >= f.recheck_at + 2 * sim.heartbeat:
                    f.recheck = sim.coord.locate(self.name, self.gen, seq, 0)
                if f.recheck is not None and f.recheck.done():
                    loc = f.recheck.value()
                    f.recheck, f.recheck_at = None, now
                    if loc.status != "ok" or loc.owner != f.owner:
                        f.phase = "locate"
                        continue
                return
            return


class Sim:
    def __init__(self, seed: int, coordinator_cls: type = Coordinator):
        self.seed, self.coordinator_cls = seed, coordinator_cls
        rng = self.rng = random.Random(seed)
        self.clock = Clock()
        self.dp = rng.choice((1, 2, 2, 3, 4))
        self.mbs = rng.choice((1, 2, 3))
        self.depth = rng.choice((1, 1, 2, 3, 4))
        self.prefetch = rng.choice((1, 2, 3))
        plan_ahead = rng.choice((self.prefetch, 2, 4, 8, 16))
        self.plan_ahead = max(plan_ahead, self.prefetch)
        self.heartbeat = 1.0
        self.lease_timeout = rng.choice((2.0, 3.0, 5.0))
        self.max_prep = rng.choice((0.0, 0.5, 1.0))
        self.target = rng.randint(4, 30)
        self.windowed = rng.random() < 0.7
        while True:  # a selection whose every group is below min_batch_size plans nothing: draw again
            try:
                self.coord, self.plan = self.draw_plan(rng)
                break
            except PlanError:
                continue
        self.producers: dict[str, Producer] = {}
        self.n_producers, self.next_join, self.log = 0, None, []
        self.faulted: dict[int, float] = {}  # seq -> when a producer owning it last failed
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            self.join()
        if not self.producers:
            self.next_join = rng.uniform(0, 10)
        lagging = rng.random() < 0.6
        self.consumers = [Consumer(self, r, rng.uniform(0, 15) if lagging and rng.random() < 0.5 else 0.0,
                                   rng.choice((0.0, 0.25, 1.0, 2.0))) for r in range(self.dp)]
        self.delivered: list[list] = [[] for _ in range(self.dp)]
        self.restarts = self.swaps = self.late_acks = 0
        self.in_flight: list[tuple[Consumer, float, str, int, list[int]]] = []
        """A crashed incarnation's acks still on their way: (its successor, delay after the
        successor registered, its name, its generation, the seqs)."""
        self.fault_rate = rng.choice((0.0, 0.02, 0.05))
        self.bound = self.lease_timeout + 3 * self.heartbeat + 3 * self.max_prep + 4 * TICK

    def draw_plan(self, rng: random.Random) -> tuple[Coordinator, list]:
        n = rng.randint(self.dp, 36)
        refs = []
        for i in range(n):
            task = rng.choice(("t2i", "t2i", "edit"))
            refs.append(SampleRef(f"k{i:03d}", BUCKETS[i % rng.randint(1, 3)], task, rng.choice(("a", "b")),
                                  (256, 256) if task == "edit" else None))
        sel = Selection(refs)
        history = [DataVersion(0, 0, 0, task_weights={"t2i": 1.0, "edit": 1.0}, source_weights={})]
        settings = CoordinatorSettings(plan_ahead=self.plan_ahead, heartbeat_s=self.heartbeat,
                                       lease_timeout_s=self.lease_timeout)
        gbs = self.dp * self.mbs
        planner = Planner(PlanSpec(self.seed, gbs, min(gbs, self.dp)), sel, list(history))
        plan = [planner.next()[1] for _ in range(self.target)]
        coord = self.coordinator_cls(sel, settings, self.seed, self.dp, self.mbs, history, clock=self.clock)
        return coord, plan

    # ---- events

    def join(self) -> None:
        name = f"producer_{self.n_producers}"
        self.producers[name] = Producer(self, name, 1 + self.n_producers, self.rng.uniform(0, self.max_prep))
        self.n_producers += 1
        self.next_join = None
        self.log.append(f"{self.clock.now:.2f} join {name}")

    def up(self) -> list[Producer]:
        return [p for p in self.producers.values() if p.state == "up"]

    def fault(self) -> None:
        rng, now = self.rng, self.clock.now
        for p in self.producers.values():
            if p.state == "silent" and now >= p.busy_until:  # busy_until doubles as the wake-up time
                p.state, p.poll = "up", None
                self.log.append(f"{now:.2f} wake {p.name}")
        if self.next_join is not None and now >= self.next_join:
            self.join()
        if rng.random() >= self.fault_rate:
            return
        up = self.up()
        kind = rng.choice(("kill", "silence", "leave", "join", "join", "restart", "swap"))
        if kind == "swap":
            self.swap()
            return
        if kind == "join" or not up:
            if len(up) < 4:
                self.join()
            return
        if kind == "restart":
            self.restart()
            return
        p = rng.choice(up)
        for seq, e in self.coord.entries.items():  # a fault of an owner restarts its batches' clock
            if e.owner == p.name:
                self.faulted[seq] = now
        if kind == "kill":
            p.state = "dead"
        elif kind == "silence":
            p.state, p.busy_until = "silent", now + rng.uniform(0.5, 3) * self.lease_timeout
        else:
            p.state = "gone"
            self.coord.producer_left(p.name)
        self.log.append(f"{now:.2f} {kind} {p.name}")
        if not self.up() and self.next_join is None:
            self.next_join = now + rng.uniform(0, 10)

    def swap(self) -> None:
        """A data-config change (`mmdit ctl set`): the batches nobody holds are planned again under
        it; every batch any rank may already hold must stay as it was."""
        from mmdit.dataservice.data_config import ChangeError

        weights = {"task_weights.edit": self.rng.choice((0.0, 0.3, 1.0, 4.0)),
                   "task_weights.t2i": self.rng.choice((0.5, 1.0, 2.0))}
        try:
            reply = self.coord.update_data(weights, why="sim")
        except ChangeError:
            return
        planner = Planner(self.coord.spec, self.coord.sel, list(self.coord.history))
        plan = [planner.next()[1] for _ in range(self.target)]
        held = reply["from_step"] - 1  # batches before it were leased: none may change
        if plan[:held] != self.plan[:held]:
            raise SimFailure(f"a change rewrote batches before step {reply['from_step']}")
        self.plan = plan
        self.swaps += 1
        self.log.append(f"{self.clock.now:.2f} swap {weights} from step {reply['from_step']}")

    def restart(self) -> None:
        """Every rank crashes and resumes from the last checkpoint (all ranks reached it)."""
        k = min(c.cursor for c in self.consumers)
        cursor = Cursor() if k == 0 else Cursor(k, self.plan[k - 1].epoch, self.plan[k - 1].index + 1)
        self.restarts += 1
        self.log.append(f"{self.clock.now:.2f} restart at {k}")
        clean = self.rng.random() < 0.5  # a clean shutdown says goodbye; a crash does not
        for r, c in enumerate(self.consumers):
            if clean:
                self.coord.consumer_left(c.name)
            fresh = Consumer(self, r, self.clock.now + self.rng.uniform(0, 3), c.step_s, self.restarts)
            fresh.cursor, fresh.cursor_pos = k, cursor
            self.consumers[r] = fresh
            del self.delivered[r][k:]
            received = [s for s in range(k, c.cursor)] + [s for s, f in c.fetches.items() if f.phase == "have"]
            if not clean and c.registered and received and self.rng.random() < 0.7:
                # its last call carried (or would have carried) acks of what it received from k on
                delay = self.rng.choice((0.0, 0.0, self.rng.uniform(0, 1)))
                self.in_flight.append((fresh, delay, c.name, c.gen, received))

    def deliver_late_acks(self) -> None:
        """Acks of crashed incarnations arrive after their successors registered."""
        now, keep = self.clock.now, []
        for fresh, delay, name, gen, seqs in self.in_flight:
            if fresh.registered_at is None or now < fresh.registered_at + delay:
                keep.append((fresh, delay, name, gen, seqs))
            elif self.windowed:
                self.coord.locate(name, gen, max(seqs) + 1, WINDOW - 1, seqs)
                self.late_acks += 1
            else:
                self.coord.ack(name, fresh.dp_rank, gen, seqs)
                self.late_acks += 1
        self.in_flight = keep

    # ---- invariants

    def deliver(self, c: Consumer, seq: int, batch) -> None:
        if seq != len(self.delivered[c.dp_rank]):
            raise SimFailure(f"rank {c.dp_rank} consumed seq {seq} after {len(self.delivered[c.dp_rank])} batches")
        if batch != self.plan[seq]:
            raise SimFailure(f"rank {c.dp_rank} got {batch} at seq {seq}, the plan says {self.plan[seq]}")
        self.delivered[c.dp_rank].append(batch)

    def check_liveness(self) -> None:
        """The oldest batch some rank needs reaches a rank waiting for it within `bound`, counted
        from when it became the oldest one and a producer was up."""
        now = self.clock.now
        if not self.up():
            self.excused = now
            return
        pending = [c.cursor for c in self.consumers if not c.done]
        oldest = min(pending, default=None)
        for c in self.consumers:
            if c.waiting_since is None or c.cursor != oldest or now < c.start_at:
                c.counted_since = None
                continue
            if c.counted_since is None:
                c.counted_since = now
            waited = now - max(c.counted_since, self.excused, self.faulted.get(c.cursor, 0.0))
            if waited > self.bound:
                raise SimFailure(f"rank {c.dp_rank} waited {waited:.2f}s (bound {self.bound:.2f}s) for seq {c.cursor} "
                                 f"with {len(self.up())} producers up; status {self.coord.status()['counters']}")

    def run(self, max_time: float = 1000.0) -> dict:
        self.excused = 0.0
        order = list(self.producers.values()) + list(self.consumers)
        while not all(c.left for c in self.consumers):
            if self.clock.now > max_time:
                raise SimFailure(f"not finished after {max_time:.0f}s: cursors {[c.cursor for c in self.consumers]}")
            self.fault()
            self.coord.reap()
            order = list(self.producers.values()) + list(self.consumers)
            self.rng.shuffle(order)
            for actor in order:
                actor.step()
            self.deliver_late_acks()
            self.check_liveness()
            self.clock.now += TICK
        for r, got in enumerate(self.delivered):
            if got != self.plan:
                raise SimFailure(f"rank {r} consumed {len(got)} batches, not the plan's {len(self.plan)}")
        return {"time": self.clock.now, "restarts": self.restarts, "swaps": self.swaps, "producers": self.n_producers,
                "late_acks": self.late_acks, "counters": self.coord.status()["counters"]}

    def describe(self) -> str:
        return (f"seed {self.seed}: {'windowed' if self.windowed else 'per_batch'} dp {self.dp} mbs {self.mbs} "
                f"depth {self.depth} prefetch {self.prefetch} "
                f"plan_ahead {self.plan_ahead} lease_timeout {self.lease_timeout} max_prep {self.max_prep} "
                f"batches {self.target} starts {[round(c.start_at, 1) for c in self.consumers]}\n  "
                + "\n  ".join(self.log[-30:]))


def run_schedule(seed: int, coordinator_cls: type = Coordinator) -> dict:
    sim = Sim(seed, coordinator_cls)
    try:
        return sim.run()
    except SimFailure as e:
        raise SimFailure(f"{e}\n{sim.describe()}") from None


def run_many(schedules: int, first_seed: int = 0) -> dict:
    """Run `schedules` schedules from `first_seed`; raise SimFailure on the first violation."""
    started = time.perf_counter()
    stats = {"restarts": 0, "producers": 0, "revoked": 0, "late_acks": 0, "sim_seconds": 0.0}
    for seed in range(first_seed, first_seed + schedules):
        out = run_schedule(seed)
        stats["restarts"] += out["restarts"]
        stats["late_acks"] += out["late_acks"]
        stats["producers"] += out["producers"]
        stats["revoked"] += out["counters"]["revoked"]
        stats["sim_seconds"] += out["time"]
    stats["wall_seconds"] = time.perf_counter() - started
    return stats


def main() -> int:
    logging.getLogger("mmdit.coordinator").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="first schedule's seed")
    args = parser.parse_args()
    for seed in range(args.seed, args.seed + args.schedules):
        try:
            run_schedule(seed)
        except SimFailure as e:
            print(f"schedule {seed - args.seed + 1} failed:\n{e}")
            return 1
    print(f"{args.schedules} schedules passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
