"""The coordinator's protocol under a thousand random schedules (tests/coordinator_sim.py).

Each schedule draws sizes, rank speeds and faults from its seed; the simulation checks after
every tick that every rank consumes exactly the plan, in order, and that the oldest batch some
rank needs reaches it within one lease timeout (plus heartbeats and preparation) while a
producer is up. `MMDIT_SIM_SCHEDULES` / `MMDIT_SIM_SEED` run more or other schedules.
"""

import logging
import os
from dataclasses import replace

import pytest
from coordinator_sim import SimFailure, run_many, run_schedule

from mmdit.dataservice.coordinator import Coordinator

SCHEDULES = int(os.environ.get("MMDIT_SIM_SCHEDULES", "1000"))  # 1000 show ~700 revocations, ~300 restarts
SEED = int(os.environ.get("MMDIT_SIM_SEED", "0"))


@pytest.fixture(autouse=True)
def quiet_coordinator():
    logger = logging.getLogger("mmdit.coordinator")
    level = logger.level
    logger.setLevel(logging.ERROR)  # producers lost and rejoining are the point here
    yield
    logger.setLevel(level)


def test_random_schedules_quick():
    """A few hundred schedules for the edit-test loop (`pytest -m "not slow"`)."""
    stats = run_many(300, SEED + 1_000_000)
    # the schedules do exercise faults, late acks of crashed clients among them
    assert stats["revoked"] > 0 and stats["restarts"] > 0 and stats["late_acks"] > 0


@pytest.mark.slow
def test_random_schedules():
    stats = run_many(SCHEDULES, SEED)
    assert stats["revoked"] > 50 and stats["restarts"] > 50 and stats["producers"] > 2 * SCHEDULES
    assert stats["late_acks"] > 10


class CapacityOnlyCoordinator(Coordinator):
    """The rule before the liveness fix: a full producer takes nothing, not even a gap."""

    def _assign(self, p):
        if len(p.owned) >= p.depth:
            return []
        return super()._assign(p)


def test_simulation_finds_the_stall_of_the_capacity_only_rule():
    """The simulation has teeth: without the gap rule, a lagging rank waits forever for batches
    revoked from a dead producer while the survivors' slots hold partly acked newer batches."""
    for seed in range(SEED, SEED + 500):
        try:
            run_schedule(seed, CapacityOnlyCoordinator)
        except SimFailure as e:
            assert "waited" in str(e)
            return
    pytest.fail("500 schedules did not find the stall of the capacity-only rule")


class AlwaysHoldCoordinator(Coordinator):
    """Lets windowed clients hold their acks even while batches wait for a producer slot."""

    def _where(self, gen, seq, ahead=0):
        where = super()._where(gen, seq, ahead)
        return where if where is None or where.status != "ok" else replace(where, ack_hold_s=1e9)


def test_simulation_finds_the_stall_of_acks_held_while_producers_are_full():
    """The windowed protocol's ack hold must drop to 0 while batches wait for a slot: held acks
    of batches every rank received keep producers full, and the rank that needs the next batch
    waits on a rank that is not calling (its trainer paused, its prefetch full)."""
    for seed in range(SEED, SEED + 500):
        try:
            run_schedule(seed, AlwaysHoldCoordinator)
        except SimFailure as e:
            assert "waited" in str(e) or "not finished" in str(e)
            return
    pytest.fail("500 schedules did not find the stall of acks held while producers are full")


class CountsEarlierIncarnationsCoordinator(Coordinator):
    """Counts the acks of a rank's earlier incarnation as its successor's."""

    def _count_acks(self, name, gen, seqs):
        rank = self.ranks_of.get(name)
        successor = self.latest.get(rank)
        if name not in self.consumers and successor in self.consumers:
            name = successor
        return super()._count_acks(name, gen, seqs)


def test_simulation_finds_late_acks_of_a_crashed_incarnation_counted():
    """A crashed client's acks still in flight (or held for a locate to carry) arrive after its
    successor registered at the checkpoint's cursor: counted, they finish a batch the successor
    has not received, and it is lost to that rank."""
    for seed in range(SEED, SEED + 500):
        try:
            run_schedule(seed, CountsEarlierIncarnationsCoordinator)
        except SimFailure as e:
            assert "done" in str(e) or "waited" in str(e) or "consumed" in str(e), str(e)[:300]
            return
    pytest.fail("500 schedules did not find the late acks of a crashed incarnation counted")
