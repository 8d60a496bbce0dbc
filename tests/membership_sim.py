"""A seeded simulation of the RPC group's membership protocol (dataservice/membership.py).

The protocol's own join and leave steps run unchanged against a simulated store; a scheduler
interleaves many processes at every store operation. TensorPipe's agent start is modelled as
torch does it: read the member list, write it back with the new name appended (not atomic), then
publish the URL, then read every listed member's URL (a listed name without one would block the
real agent until its store timeout). The coordinator's admission is `admission_problem` fed
with what the joiner's configuration makes the call-back return.

A schedule, drawn from one seed, starts joiners of every kind at random times: good ones, ones
that advertise loopback, that the coordinator cannot call back, whose address answers as another
process, that cannot reach the coordinator, whose agent fails after listing itself; some leave
gracefully later, some are killed at a random operation (inside the critical section too), and
some stall there longer than the stale-token time and then go on.

Checked after every operation:
- the coordinator is always listed, and every listed name has a URL (no poisoned entry);
- a process only ever adds or removes its own entry, except TensorPipe's append when a stalled
  holder's token was broken (two appends at once may lose one: counted, and then only the
  coordinator's entry is guaranteed);
- a rejected or failed join leaves the list as it found it;
and at the end: every good joiner that was neither killed nor stalled was admitted within its
token timeout, none of another kind was, and every admitted member still alive is listed.

Run many: `python tests/membership_sim.py --schedules 20000 [--seed S]`.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field

from mmdit.dataservice import membership as M

COORDINATOR_URL = "uv://10.0.0.1:1000"
KINDS = ("good", "good", "good", "loopback", "unreachable", "wrong", "no_coordinator", "agent_fails")
STALE_S, TIMEOUT_S, STEP_S = 5.0, 120.0, 0.05


class SimFailure(AssertionError):
    pass


@dataclass
class Proc:
    name: str
    rank: int
    kind: str
    url: str
    steps: object = None
    wake: float = 0.0
    result: object = None
    error: BaseException | None = None
    done: bool = False
    outcome: str = ""  # admitted | rejected | failed | left
    killed: bool = False
    kill_at: int = -1  # its n-th operation
    stall_at: int = -1
    stall_s: float = 0.0
    ops: int = 0
    leave_after: float = -1.0
    start: float = 0.0
    finished: float = 0.0
    list_at_token: list | None = None  # the list when it took the token, and when it gave it back
    list_at_release: list | None = None
    agent_pending: list = field(default_factory=list)  # the agent's remaining sub-steps


class Sim:
    def __init__(self, seed: int, join=M.join):
        self.rng = random.Random(seed)
        self.join = join
        self.store: dict[str, str] = {}
        self.now = 0.0
        self.procs: list[Proc] = []
        self.unsafe = 0  # tokens of live (stalled) holders broken: appends may race

    # ---- the store and the agent, as the protocol sees them

    def execute(self, p: Proc, op: tuple):
        kind = op[0]
        if kind == "get":
            return self.store.get(op[1])
        if kind == "set":
            self.store[op[1]] = op[2]
            return None
        if kind == "cas":
            key, expected, desired = op[1:]
            current = self.store.get(key, "")
            if current == expected:
                if key == M.TOKEN and expected and desired:  # a stale token broken: is its holder alive?
                    holder = self._holder(expected)
                    if holder is not None and holder is not p and not holder.killed and not holder.done:
                        self.unsafe += 1
                if key == M.LIST:
                    self._write(p, current, desired)
                self.store[key] = desired
                return desired
            return current
        if kind == "wait":
            p.wake = self.now + (0.0 if op[1] in self.store else op[2])
            return None
        if kind == "now":
            return self.now
        if kind == "admit":
            return self._admit(p, op[1])
        if kind in ("notify_leave", "shutdown"):
            return None
        raise SimFailure(f"unknown operation {op}")

    def _holder(self, token: str) -> Proc | None:
        return next((q for q in self.procs if token.startswith(f"Token_for_{q.name}_")), None)

    def _write(self, p: Proc, old: str | None, new: str) -> None:
        before, after = set(M.entries(old)), set(M.entries(new))
        own = M.entry(p.name, p.rank)
        others = (before ^ after) - {own}
        if others and not self.unsafe:
            raise SimFailure(f"{p.name} changed others' entries {sorted(others)}")

    def _admit(self, p: Proc, url: str):
        if p.kind == "no_coordinator":
            raise RuntimeError("connection refused (the coordinator's address)")
        answered, error = p.name, None
        if p.kind == "unreachable":
            answered, error = None, "connection refused"
        elif p.kind == "wrong":
            answered = "producer_other_1"
        return M.admission_problem(p.name, url, COORDINATOR_URL, answered, error)

    # ---- TensorPipe's agent start, in the steps torch takes

    def agent_steps(self, p: Proc) -> list:
        def read_list():
            p.agent_pending.insert(0, ("write", self.store.get(M.LIST)))

        return [read_list]

    def _agent_step(self, p: Proc) -> None:
        step = p.agent_pending.pop(0)
        if callable(step):
            step()
            return
        what = step[0]
        if what == "write":  # torch: list = read + "name-rank," (a plain set)
            old = self.store.get(M.LIST)
            new = (step[1] or "") + f"{M.entry(p.name, p.rank)},"
            self._write_append(p, old, new)
            self.store[M.LIST] = new
            p.agent_pending.insert(0, ("publish",))
        elif what == "publish":
            if p.kind == "agent_fails":
                p.agent_pending.clear()
                p.result, p.error = None, RuntimeError("TensorPipe failed to start")
                return
            self.store[M.addr_key(p.name)] = p.url
            p.agent_pending.insert(0, ("read_urls",))
        elif what == "read_urls":
            missing = [e for e in M.entries(self.store.get(M.LIST)) if M.addr_key(e.rsplit("-", 1)[0]) not in self.store]
            if missing:
                raise SimFailure(f"{p.name}'s agent would wait forever for the URL of {missing}")
            p.result, p.error = p.url, None

    def _write_append(self, p: Proc, old: str | None, new: str) -> None:
        lost = set(M.entries(old)) - set(M.entries(new))
        if lost and not self.unsafe:
            raise SimFailure(f"{p.name}'s append lost {sorted(lost)} though no live holder's token was broken")

    # ---- processes

    def spawn(self, kind: str, rank: int, at: float) -> Proc:
        host = "127.0.0.1" if kind == "loopback" else f"10.0.{rank // 250}.{rank % 250 + 2}"
        p = Proc(f"p{rank}_{kind}", rank, kind, f"uv://{host}:{2000 + rank}", wake=at, start=at)
        p.steps = self.join(p.name, p.rank, TIMEOUT_S, STALE_S)
        self.procs.append(p)
        return p

    def step(self, p: Proc) -> None:
        p.ops += 1
        if p.ops == p.kill_at:
            p.killed = p.done = True
            p.outcome = p.outcome or "killed"
            return
        if p.ops == p.stall_at:
            p.wake = self.now + p.stall_s
            return
        if p.agent_pending:
            self._agent_step(p)
            return
        try:
            op = p.steps.throw(p.error) if p.error is not None else p.steps.send(p.result)
        except StopIteration:
            self._finished(p, None)
            return
        except M.Rejected as e:
            self._finished(p, e)
            return
        except Exception as e:  # noqa: BLE001 - a failed join: its message is the outcome
            self._finished(p, e)
            return
        p.result, p.error = None, None
        if op[0] == "agent":
            p.agent_pending = self.agent_steps(p)
            return
        try:
            p.result = self.execute(p, op)
        except SimFailure:
            raise
        except Exception as e:  # noqa: BLE001 - an operation's failure goes back into the protocol
            p.error = e
        if op[0] == "cas" and op[1] == M.TOKEN and p.result == op[3] and op[3]:
            p.list_at_token = M.entries(self.store.get(M.LIST))
        elif op[0] == "cas" and op[1] == M.TOKEN and op[2] and not op[3]:
            p.list_at_release = M.entries(self.store.get(M.LIST))

    def _finished(self, p: Proc, error: BaseException | None) -> None:
        p.finished = self.now
        if p.outcome == "member":  # a leave ended
            p.done, p.outcome = True, "left" if error is None else "left_failed"
            return
        if error is None:
            p.outcome = "member"
            if p.leave_after >= 0:
                p.steps = M.leave(p.name, p.rank, TIMEOUT_S, STALE_S)
                p.wake = self.now + p.leave_after
                p.result = p.error = None
                return
            p.done = True
            return
        p.done = True
        p.outcome = "rejected" if isinstance(error, M.Rejected) else "failed"
        if not self.unsafe and p.list_at_token is not None:
            before, after = sorted(p.list_at_token), sorted(p.list_at_release or [])
            if before != after:
                raise SimFailure(f"{p.name}'s failed join changed the list: {before} -> {after}")

    def check(self) -> None:
        listed = M.entries(self.store.get(M.LIST))
        if M.entry("coordinator", 0) not in listed:
            raise SimFailure(f"the coordinator left the list: {listed}")
        for e in listed:
            if M.addr_key(e.rsplit("-", 1)[0]) not in self.store:
                raise SimFailure(f"{e} is listed without a URL")

    def run(self, joiners: int) -> dict:
        coordinator = Proc("coordinator", 0, "coordinator", COORDINATOR_URL)
        coordinator.steps = self.join("coordinator", 0, TIMEOUT_S, STALE_S, admitted_by_coordinator=False)
        self.procs.append(coordinator)
        while not coordinator.done and coordinator.outcome != "member":
            self.step(coordinator)
        if coordinator.outcome != "member":
            raise SimFailure(f"the coordinator could not create the group: {coordinator.outcome}")
        coordinator.done = True
        rng = self.rng
        for rank in range(1, joiners + 1):
            p = self.spawn(rng.choice(KINDS), rank, rng.uniform(0, 20))
            fate = rng.random()
            if fate < 0.12:
                p.kill_at = rng.randint(1, 20)
            elif fate < 0.18:
                p.stall_at, p.stall_s = rng.randint(1, 20), rng.uniform(STALE_S, 3 * STALE_S)
            if p.kind == "good" and rng.random() < 0.3:
                p.leave_after = rng.uniform(0, 10)
        limit = 20 + joiners * 4 * STALE_S + TIMEOUT_S
        while any(not p.done for p in self.procs):
            ready = [p for p in self.procs if not p.done and p.wake <= self.now]
            if not ready:
                self.now = min(p.wake for p in self.procs if not p.done)
            else:
                self.step(rng.choice(ready))
                self.check()
                self.now += rng.choice((0.0, 0.0, STEP_S))
            if self.now > limit:
                stuck = [p.name for p in self.procs if not p.done]
                raise SimFailure(f"still running at t={self.now:.0f}: {stuck}")
        return self.verdict()

    def verdict(self) -> dict:
        listed = M.entries(self.store.get(M.LIST))
        for p in self.procs[1:]:
            clean = not p.killed and p.stall_at < 0
            if p.kind == "good" and clean and p.outcome not in ("member", "left"):
                raise SimFailure(f"good joiner {p.name} ended {p.outcome}")
            if p.kind != "good" and p.outcome in ("member", "left"):
                raise SimFailure(f"{p.name} ({p.kind}) was admitted")
            if p.outcome == "member" and not p.killed and not self.unsafe and M.entry(p.name, p.rank) not in listed:
                raise SimFailure(f"member {p.name} is not listed")
            if p.outcome == "left" and not self.unsafe and M.entry(p.name, p.rank) in listed:
                raise SimFailure(f"{p.name} left but is still listed")
        outcomes: dict[str, int] = {}
        for p in self.procs[1:]:
            outcomes[p.outcome] = outcomes.get(p.outcome, 0) + 1
        return {"outcomes": outcomes, "unsafe": self.unsafe, "time": self.now}


def run_schedules(n: int, seed: int = 0, join=M.join, joiners: tuple[int, int] = (2, 12)) -> dict:
    totals: dict[str, int] = {}
    for k in range(n):
        s = seed + k
        try:
            verdict = Sim(s, join).run(random.Random(s).randint(*joiners))
        except SimFailure as e:
            raise SimFailure(f"schedule {s}: {e}") from None
        for outcome, count in verdict["outcomes"].items():
            totals[outcome] = totals.get(outcome, 0) + count
        totals["unsafe"] = totals.get("unsafe", 0) + verdict["unsafe"]
    return totals


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(run_schedules(args.schedules, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
