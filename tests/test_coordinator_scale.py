"""The coordinator at scale, in process (no RPC): the windowed locate carrying acks, the ack hold
it allows, idle producers' longer polls, per-batch work that does not grow with DP ranks, and
its own health on /metrics and the dashboard's series."""

import logging
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mmdit.config.service import ServiceConfig
from mmdit.dataservice.coordinator import ACK_HOLD_HEARTBEATS, IDLE_POLL_HEARTBEATS, Coordinator
from mmdit.dataservice.plan import DataVersion, SampleRef, Selection
from mmdit.dataservice.telemetry import PrometheusCollector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

SEL = Selection([SampleRef(f"k{i:03d}", (256, 256), "t2i") for i in range(64)])
V0 = [DataVersion(0, 0, 0, task_weights={"t2i": 1.0})]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def coordinator(dp: int = 2, plan_ahead: int = 8, lease_timeout_s: float = 20.0):
    clock = Clock()
    svc = ServiceConfig(plan_ahead=plan_ahead, heartbeat_s=1.0, lease_timeout_s=lease_timeout_s)
    c = Coordinator(SEL, svc, seed=1, dp_size=dp, micro_batch_size=2, history=list(V0), clock=clock)
    for r in range(dp):
        c.register_consumer(f"t{r}", 10 + r, r, dp, 2, None, None)
    return c, clock


def test_a_window_locate_names_the_leased_owners_and_carries_acks():
    c, _ = coordinator(plan_ahead=4)  # two producers of depth 2 hold the whole plan window
    a = c.lease("pa", 1, 2, []).wait()
    b = c.lease("pb", 2, 2, []).wait()
    c.lease("pa", 1, 2, [(c.gen, s) for s, _ in a.new]).wait()
    c.lease("pb", 2, 2, [(c.gen, s) for s, _ in b.new]).wait()
    where = c.locate("t0", c.gen, 0, 31).wait()
    assert where.status == "ok" and where.owner == "pa"
    assert {s: o[0] for s, o in where.ahead.items()} == {1: "pb", 2: "pa", 3: "pb"}  # only leased batches
    # every planned batch has a producer: the client may hold its acks for a later call
    assert where.ack_hold_s == ACK_HOLD_HEARTBEATS * 1.0
    parked = c.lease("pa", 1, 2, [(c.gen, 0), (c.gen, 2)])  # full: parks
    assert not parked.done()
    early = c.locate("t0", c.gen, 4, 31, [0])  # batch 4 has no producer yet: this locate waits
    assert not parked.done() and not early.done()  # one DP rank of two acked batch 0
    late = c.locate("t1", c.gen, 4, 31, [0], {"step": 1, "loss": 0.5}).wait()  # the acks ride on the locate
    reply = parked.wait()
    assert 0 not in reply.keep and [s for s, _ in reply.new] == [4]
    assert late.owner == "pa" and early.wait().owner == "pa"  # the waiting locate is answered too
    assert c.telemetry.trainers[1]["loss"] == 0.5  # the report too
    assert c.calls["ack"] == 0 and c.calls["locate"] == 3


def test_acks_are_not_held_while_batches_wait_for_a_slot():
    c, _ = coordinator()
    c.lease("pa", 1, 1, []).wait()  # one producer, depth 1: batch 1 waits for batch 0's acks
    c.lease("pa", 1, 1, [(c.gen, 0)])
    assert c.locate("t0", c.gen, 0, 31).wait().ack_hold_s == 0.0


def settle(c, name: str, rank: int, depth: int):
    """A producer polls, holding what it was given, until its poll parks; returns the parked poll."""
    held: list = []
    while True:
        fut = c.lease(name, rank, depth, held)
        if not fut.done():
            return fut
        reply = fut.wait()
        held = [(reply.gen, s) for s in reply.keep]


def test_an_idle_producer_polls_every_few_heartbeats_a_busy_one_every_heartbeat():
    c, clock = coordinator(lease_timeout_s=20.0)
    busy = settle(c, "pa", 1, 8)  # takes the whole plan window (8 batches)
    idle = settle(c, "pc", 3, 8)  # nothing left for it
    assert len(c.status()["producers"]["pa"]["seqs"]) == 8 and not c.status()["producers"]["pc"]["seqs"]
    assert not busy.done() and not idle.done()
    clock.now = 1.01
    c.reap()
    assert busy.done() and not idle.done()
    clock.now = IDLE_POLL_HEARTBEATS * 1.0 + 0.01
    c.reap()
    assert idle.done() and idle.wait().new == []
    # parked that long, it is not silent: silence counts from its answer, not from its call
    clock.now += 19.0
    c.reap()
    assert c.status()["producers"]["pc"]["alive"]
    clock.now += 2.0
    c.reap()
    assert not c.status()["producers"]["pc"]["alive"]


def test_per_batch_work_does_not_grow_with_dp_ranks_and_producers():
    """The scale model (bench/coordinator_model.py): coordinator CPU per global batch at 256 DP
    ranks and 512 producers within 3x of 32 and 64 (it was 50x: every ack scanned every producer
    and rebuilt the set of DP ranks), and calls per batch bounded by the window and the hold."""
    from coordinator_model import measure

    logging.getLogger("mmdit.coordinator").setLevel(logging.ERROR)
    small = measure(Coordinator, "windowed", 32, 64, seconds=2.0, rate=8.0)
    large = measure(Coordinator, "windowed", 256, 512, seconds=2.0, rate=8.0)
    assert large["cpu_ms_per_global_batch"] < 3 * small["cpu_ms_per_global_batch"] + 1.0, (small, large)
    # a call per rank per hold and per window, idle polls every few heartbeats: ~256/2/8 + 256/32 + 512/5/8
    assert large["calls_per_global_batch"] < 40, large


def test_health_on_metrics_and_in_the_dashboard_series():
    c, clock = coordinator()
    first = c.health()
    c.telemetry.tick(0, first)
    c.lease("pa", 1, 2, []).wait()
    for r in range(2):
        c.locate(f"t{r}", c.gen, 0, 31).wait()
    c.ack("t0", 0, c.gen, [0])
    health = c.health()
    assert health["calls"] == {"lease": 1, "locate": 2, "ack": 1, "register": 2}
    assert health["lock_held_s"] > 0 and health["pending"] >= 1
    health["time"] = first["time"] + 1.0  # one tick later
    c.telemetry.tick(1, health)
    point = c.telemetry.series()["coordinator"]
    assert point["locate_per_second"] == [pytest.approx(2.0)] and point["pending"] == [health["pending"]]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(c, c.telemetry))
    text = generate_latest(registry).decode()
    assert 'mmdit_coordinator_calls_total{kind="locate"} 2.0' in text
    assert "mmdit_coordinator_lock_held_seconds_total" in text and 'mmdit_coordinator_queue{queue="pending"}' in text
    assert "mmdit_coordinator_cpu_fraction" in text
