"""The data service's RPC member list: who may change it, and when (the protocol rpc.py runs).

The group's store, which the coordinator hosts, holds torch's keys:

    names/_ALL_WORKER_INFOS   "name-rank,name-rank,": the members a joiner's agent starts from
    names/<rank>              a member's name (names/0: the coordinator's)
    addrs/<name>              the URL the member's TensorPipe agent listens on
    RpcGroupManagementToken   the critical section of joins and leaves

A joiner's TensorPipe agent appends the joiner to the list when it is built, publishes its URL
when it starts, and reads every listed member's URL: that is how it finds the coordinator
(rank 0). The rules:

1. The list changes only inside the token's critical section. A token held longer than
   `stale_s` belongs to a process that died in it (a join takes a few store operations and one
   admission call, bounded by the admission timeout) and is broken. (A holder only stalled that
   long, say SIGSTOPped, then races its breaker: an entry may be lost, which costs nothing, as
   callers learn of members from the coordinator; the coordinator's entry is never lost.)
2. A process adds and removes only itself; a joiner never calls the other members. So a member
   a joiner cannot reach (misconfigured joiner, partitioned network) is never taken for dead and
   dropped: one bad process cannot break a running job. (torch's own dynamic join calls every
   member and fails on the first that does not answer; the previous mmdit join dropped those.)
   A crashed member's entry stays: no joiner calls it, and nothing depends on the list but joins.
3. Before its name enters the list a joiner publishes a placeholder URL (refused at once), so a
   joiner killed in between never leaves a listed name without a URL: a later joiner's agent
   would wait for that URL until its store timeout, and so would every join after it.
4. The coordinator admits a joiner before it counts as a member (`admission_problem`): its URL
   must not be a loopback address unless the coordinator's is, and it must answer the
   coordinator, under its own name (an address that reaches another process is as wrong as one
   that reaches nothing). A joiner the coordinator rejects, or that cannot reach the
   coordinator, removes itself (the list is as before it came) and fails with one line. (While
   the coordinator checks, the joiner is listed already, as torch's agent lists itself when it is
   built; it holds the token then, so no other process reads or changes the list meanwhile.)

Each step is a generator that yields store and agent operations and gets their results back:
`rpc.py` runs them against the real store and TensorPipe agent, `tests/membership_sim.py`
against a simulated store, interleaving many processes at every operation, with crashes, stalls
and misconfigured joiners, and checks these rules.

Operations (tuples): ("get", key) -> str | None; ("set", key, value); ("cas", key, expected,
desired) -> the value stored after it; ("wait", key, timeout_s): until the key exists or the
timeout; ("now",) -> seconds; ("agent",) -> own URL: build and start the TensorPipe agent;
("admit", url) -> None or why the coordinator rejects it (raises when it cannot be reached);
("notify_leave",): tell the members this one leaves (a courtesy, never fails); ("shutdown",).
"""

from __future__ import annotations

from urllib.parse import urlsplit

LIST = "names/_ALL_WORKER_INFOS"
RANK0 = "names/0"  # torch's: the name of rank 0 (the coordinator, which admits joiners)
TOKEN = "RpcGroupManagementToken"  # torch's key: its own tools see the same critical section
PLACEHOLDER_URL = "uv://127.0.0.1:0"
"""A URL every caller is refused at (port 0), published for a name before it enters the list."""


class MembershipError(RuntimeError):
    """The group's membership could not be changed (token held too long, store gone)."""


class Rejected(MembershipError):
    """The coordinator did not admit this joiner; the message says why."""


def addr_key(name: str) -> str:
    return f"addrs/{name}"


def entry(name: str, rank: int) -> str:
    return f"{name}-{rank}"


def entries(members: str | None) -> list[str]:
    return [e for e in (members or "").split(",") if e]


def url_host(url: str) -> str:
    """The host of a TensorPipe URL (`uv://10.0.0.1:4242` -> 10.0.0.1)."""
    return urlsplit(url).hostname or ""


def is_loopback_url(url: str) -> bool:
    host = url_host(url)
    return host == "localhost" or host == "::1" or host.startswith("127.")


# ----------------------------------------------------------------------------- the token


def acquire_token(name: str, what: str, timeout_s: float, stale_s: float):
    """Take the critical section; returns this holder's token. Breaks a token held > stale_s."""
    mine = f"Token_for_{name}_{what}"
    start = yield ("now",)
    holder, held_since = None, start
    while True:
        current = yield ("cas", TOKEN, "", mine)
        if current == mine:
            return mine
        now = yield ("now",)
        if current != holder:
            holder, held_since = current, now
        if now - held_since > stale_s and (yield ("cas", TOKEN, holder, mine)) == mine:
            return mine  # its holder died inside (see rule 1)
        if now - start > timeout_s:
            raise MembershipError(f"{name}: RPC group membership token held by {holder} for {timeout_s:.0f}s")
        yield ("wait", holder, 0.2)  # a holder sets its token key when it releases


def release_token(mine: str):
    """Leave the critical section (only if this holder still has it) and wake the waiters."""
    yield ("cas", TOKEN, mine, "")
    yield ("set", mine, "Done")


# ----------------------------------------------------------------------------- own entry


def remove_own_entry(name: str, rank: int):
    """Take this process's entry off the list (rule 2: only its own); atomic against any writer."""
    mine = entry(name, rank)
    while True:
        current = yield ("get", LIST)
        if mine not in entries(current):
            return
        kept = "".join(f"{e}," for e in entries(current) if e != mine)
        if (yield ("cas", LIST, current, kept)) == kept:
            return


# ----------------------------------------------------------------------------- join and leave


def join(name: str, rank: int, timeout_s: float, stale_s: float, admitted_by_coordinator: bool = True):
    """A join, from the token to admission; returns the agent's URL. The coordinator (rank 0)
    creates the group and is admitted by nobody (`admitted_by_coordinator=False`)."""
    mine = yield from acquire_token(name, "join", timeout_s, stale_s)
    try:
        yield ("set", addr_key(name), PLACEHOLDER_URL)  # rule 3
        url = yield ("agent",)
        if admitted_by_coordinator:
            problem = yield ("admit", url)
            if problem:
                raise Rejected(problem)
    except GeneratorExit:  # the process is gone (a simulated kill): nothing of it runs any more
        raise
    except BaseException as failure:
        yield from _quietly(remove_own_entry(name, rank))  # the agent may have listed it before failing
        yield ("shutdown",)
        yield from _quietly(release_token(mine))
        raise failure
    yield from _quietly(release_token(mine))
    return url


def leave(name: str, rank: int, timeout_s: float, stale_s: float):
    """A graceful leave: tell the members, take this process's entry off the list."""
    mine = yield from acquire_token(name, "leave", timeout_s, stale_s)
    try:
        yield ("notify_leave",)
        yield from remove_own_entry(name, rank)
    except GeneratorExit:
        raise
    except BaseException as failure:
        yield from _quietly(release_token(mine))
        raise failure
    yield from _quietly(release_token(mine))


def _quietly(steps):
    """`steps`, for a clean-up: a failure there (the store is gone) must not hide the first one."""
    try:
        yield from steps
    except Exception:  # noqa: BLE001 - see above
        pass


# ----------------------------------------------------------------------------- admission


def admission_problem(name: str, url: str, coordinator_url: str, answered_as: str | None,
                      error: str | None) -> str | None:
    """Why the coordinator must not admit `name` (listening at `url`), or None. `answered_as`:
    the name the process at `url` gave when the coordinator called it back; `error`: why that
    call failed (it was not made for a loopback URL the coordinator must refuse anyway)."""
    if is_loopback_url(url) and not is_loopback_url(coordinator_url):
        return (f"{name} advertises {url_host(url)}, a loopback address, but the coordinator listens on "
                f"{url_host(coordinator_url)}: members on other hosts could never reach it")
    if error is not None:
        return f"the coordinator cannot reach {name} at {url}: {error}"
    if answered_as != name:
        return f"{url}, where {name} says it listens, answers as {answered_as}: that address is another process's"
    return None


def run(steps, execute):
    """Drive protocol `steps` with `execute(op) -> result`; an operation's exception is raised
    inside the protocol (which cleans up and re-raises). Returns what the steps return."""
    result, error = None, None
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration as done:
            return done.value
        try:
            result, error = execute(op), None
        except Exception as e:  # noqa: BLE001 - handed to the protocol, which re-raises
            result, error = None, e
