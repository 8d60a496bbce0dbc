"""The RPC group's membership protocol (dataservice/membership.py), without processes.

tests/membership_sim.py runs the protocol's own steps against a simulated store, interleaving
good and misconfigured joiners, leaves, kills and stalls at every operation; here a few thousand
schedules run, and the simulation is shown to catch the protocol's earlier faults (a failed
joiner that drops the members it could not reach, a name listed before its URL, a dead holder's
token never broken). The real processes are in test_rpc_group.py and test_multihost.py.
"""

import membership_sim as sim
import pytest

from mmdit.dataservice import membership as M


def test_the_protocol_holds_over_random_schedules():
    totals = sim.run_schedules(1500, seed=1)
    # every kind of ending happened, many times
    assert all(totals.get(k, 0) > 100 for k in ("member", "left", "rejected", "failed", "killed")), totals


def _filtered(steps, drop):
    """`steps` without the operations `drop` selects (a protocol with a rule taken out)."""
    result, error = None, None
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration as done:
            return done.value
        if drop(op):
            result, error = None, None
            continue
        try:
            result, error = (yield op), None
        except Exception as e:  # noqa: BLE001 - back into the protocol
            result, error = None, e


def join_without_placeholder(*args, **kwargs):
    return (yield from _filtered(M.join(*args, **kwargs), lambda op: op[0] == "set" and op[2] == M.PLACEHOLDER_URL))


def join_that_drops_members_it_cannot_reach(name, rank, *args, **kwargs):
    """The join before this protocol: a joiner whose calls to the members fail drops them."""
    try:
        return (yield from M.join(name, rank, *args, **kwargs))
    except M.MembershipError:
        while True:
            current = yield ("get", M.LIST)
            kept = "".join(f"{e}," for e in M.entries(current) if e.startswith("coordinator-") or e == f"{name}-{rank}")
            if (yield ("cas", M.LIST, current, kept)) == kept:
                break
        raise


def join_never_breaking_a_token(name, rank, timeout_s, stale_s, **kwargs):
    return (yield from M.join(name, rank, timeout_s, 1e9, **kwargs))


@pytest.mark.parametrize("broken,caught", [
    (join_without_placeholder, "without a URL"),
    (join_that_drops_members_it_cannot_reach, "changed others' entries"),
    (join_never_breaking_a_token, "ended failed"),
])
def test_the_simulation_catches_a_broken_protocol(broken, caught):
    with pytest.raises(sim.SimFailure, match=caught):
        sim.run_schedules(1500, seed=1, join=broken)


CO, CO_LOOP = "uv://10.0.0.1:4000", "uv://127.0.0.1:4000"


@pytest.mark.parametrize("url,coordinator,answered,error,words", [
    ("uv://10.0.0.2:5000", CO, "p_1", None, None),
    ("uv://127.0.0.1:5000", CO_LOOP, "p_1", None, None),  # a local service: loopback everywhere
    ("uv://127.0.0.1:5000", CO, None, None, "advertises 127.0.0.1, a loopback address"),
    ("uv://127.0.1.1:5000", CO, None, None, "advertises 127.0.1.1, a loopback address"),
    ("uv://10.0.0.2:5000", CO, None, "connection refused", "cannot reach p_1 at uv://10.0.0.2:5000: connection"),
    ("uv://10.0.0.2:5000", CO, "trainer_9", None, "answers as trainer_9"),
])
def test_admission(url, coordinator, answered, error, words):
    problem = M.admission_problem("p_1", url, coordinator, answered, error)
    assert (problem is None) if words is None else (words in problem), problem


def test_only_its_own_entry_is_removed():
    store = {M.LIST: "coordinator-0,a_1-1,aa_1-11,ba_1-1x,"}
    steps = M.remove_own_entry("a_1", 1)

    def execute(op):
        if op[0] == "get":
            return store.get(op[1])
        if op[0] == "cas" and store.get(op[1]) == op[2]:
            store[op[1]] = op[3]
        return store.get(op[1])

    M.run(steps, execute)
    assert store[M.LIST] == "coordinator-0,aa_1-11,ba_1-1x,"
