"""TensorPipe RPC for the data service: join and leave a dynamic group, and make calls that fail.

The coordinator is rank 0 and hosts the group's TCPStore; producers and trainer clients join and
leave while the job runs, each under a name unique to its incarnation.

Why not plain `rpc.init_rpc(name, rank=r)` without `world_size` (torch's dynamic membership)?
Measured with torch 2.13 it breaks on the first crash in a long-running group:
- a joiner sends `rpc_sync` to *every* member it finds in the store; a member that was
  SIGKILLed never answers, so the join fails after the RPC timeout, and
- it fails inside torch's membership critical section without releasing the store token, so
  every later join and graceful leave waits on that token forever;
- `rpc.shutdown(graceful=True)` of a dynamic member has the same two problems;
- the store lists members as "name-rank," and splits on "-": a name with a dash makes the next
  joiner fail with `ValueError: stoi`. Incarnation names here therefore use underscores
  (`producer_<host>_<pid>_<n>`), never dashes.

So this module registers its own backend, `MMDIT_TENSORPIPE`: the same `TensorPipeAgent`, joined
the same way, except that members are told of a join or leave concurrently with a short timeout,
a member that does not answer is pruned from the store's member list (so later joiners never
wait on it), and the membership token is always released, and broken if its holder died.
Ranks are unique per incarnation, drawn from a counter in the store.

Transport errors (a dead peer: `eof`, connection refused) surface at once; a hung peer surfaces
as a timeout. `call` retries only timeouts, and only for calls the caller declares idempotent.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import re
import socket
import time

import torch.distributed as dist
import torch.distributed.rpc as rpc
from torch.distributed.rpc import api as rpc_api
from torch.distributed.rpc import backend_registry
from torch.distributed.rpc._utils import _update_group_membership

from mmdit.utils.store import is_loopback, rendezvous_url

log = logging.getLogger("mmdit.rpc")

COORDINATOR = "coordinator"
"""The coordinator's RPC name: rank 0, the store host; one per job, so no incarnation suffix."""
BACKEND_NAME = "MMDIT_TENSORPIPE"
_TOKEN_KEY = "RpcGroupManagementToken"  # torch's key: its own tools see the same critical section
_MEMBERS_KEY = "_ALL_WORKER_INFOS"  # torch's member list "name-rank,name-rank,"
_RANK_COUNTER = "mmdit_rank_counter"
_SERVICE_ID = "mmdit_service_id"  # the coordinator's id, as published with its address (address.py)
_incarnations = itertools.count()


class RpcError(RuntimeError):
    """A data-service RPC that could not complete (peer dead, timeout, group unreachable)."""


# ----------------------------------------------------------------------------- names and ranks


def host_tag(host: str | None = None) -> str:
    """This host's name in the alphabet RPC names allow, without dashes (see module doc)."""
    return re.sub(r"[^A-Za-z0-9]", "_", host or socket.gethostname())[:48] or "host"


def incarnation_name(role: str, n: int | None = None, pid: int | None = None, host: str | None = None) -> str:
    """`<role>_<host>_<pid>_<n>`: unique per process start; a crashed member's name is never reused.

    `n` counts incarnations started by one launcher (so a restarted producer that happens to get a
    recycled pid still has a new name); by default a per-process counter.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", role):
        raise ValueError(f"RPC role {role!r} must be letters, digits and underscores")
    n = next(_incarnations) if n is None else n
    return f"{role}_{host_tag(host)}_{os.getpid() if pid is None else pid}_{n}"


def _connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def allocate_rank(host: str, port: int, timeout_s: float, service_id: str = "") -> int:
    """A rank never used before in this group (1, 2, ...): ranks must be unique per incarnation.
    With `service_id` (from a published address), only in the group of the service that has it."""
    store = _connect_store(host, port, timeout_s)
    if service_id:
        theirs = store.get(_SERVICE_ID).decode() if store.check([_SERVICE_ID]) else ""
        if theirs != service_id:
            raise RpcError(f"the service at {host}:{port} is not the one whose address was published (service id "
                           f"{theirs or 'none'}, published {service_id}): that service is gone and another took "
                           "its port")
    return int(store.add(_RANK_COUNTER, 1))


def _hosted_store() -> dist.TCPStore:
    """The store this process hosts (rank 0), under the prefix stores torch's init_rpc wraps it in."""
    store = rpc_api._get_current_rpc_agent().store
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


def hosted_port() -> int:
    """The port of the store this process hosts (rank 0): the one the kernel gave it for port 0."""
    return int(_hosted_store().port)


# ----------------------------------------------------------------------------- membership


@contextlib.contextmanager
def _membership_token(store, name: str, what: str, timeout_s: float, stale_s: float):
    """Hold the group's join/leave critical section; always released, broken if held > stale_s.

    A holder killed inside the section would otherwise block every later join forever.
    """
    mine = f"Token_for_{name}_{what}"
    deadline = time.monotonic() + timeout_s
    holder, held_since = None, time.monotonic()
    while True:
        current = store.compare_set(_TOKEN_KEY, "", mine).decode()
        if current == mine:
            break
        if current != holder:
            holder, held_since = current, time.monotonic()
        if time.monotonic() - held_since > stale_s:
            log.warning("%s: breaking membership token held by %s for %.1fs", name, holder, stale_s)
            if store.compare_set(_TOKEN_KEY, holder, mine).decode() == mine:
                break
        if time.monotonic() > deadline:
            raise RpcError(f"{name}: RPC group membership token held by {holder} for {timeout_s:.0f}s")
        with contextlib.suppress(Exception):  # the holder sets its token key when it releases
            store.wait([holder], datetime.timedelta(seconds=0.2))
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            store.compare_set(_TOKEN_KEY, mine, "")
            store.set(mine, "Done")


def _prune_members(store, dead: list[rpc.WorkerInfo]) -> None:
    """Remove dead members from torch's member list (under the membership token)."""
    names = dist.PrefixStore("names", store)
    members = names.get(_MEMBERS_KEY).decode()
    for w in dead:
        members = members.replace(f"{w.name}-{w.id},", "")
    names.set(_MEMBERS_KEY, members)


def _broadcast_membership(agent, is_join: bool, timeout_s: float) -> list[rpc.WorkerInfo]:
    """Tell every other member that this one joins/leaves, concurrently; return the dead ones.

    Dead means a transport failure (eof, connection refused or reset). A member that is only slow
    (a timeout, e.g. on an overloaded host) is kept: it still answers calls; if it missed the
    notice it learns of this member later through `ensure_known`.
    """
    me = agent.get_worker_info()
    others = [w for w in agent.get_worker_infos() if w.name != me.name]
    futures = []
    for w in others:
        try:
            futures.append(rpc.rpc_async(w.name, _update_group_membership, args=(me, [], {}, is_join),
                                         timeout=timeout_s))
        except Exception:  # noqa: BLE001 - a member we cannot even send to is dead
            futures.append(None)
    failed = []
    for w, fut in zip(others, futures):
        try:
            if fut is None:
                raise RpcError("send failed")
            fut.wait()
        except Exception as e:  # noqa: BLE001 - classified below
            dead = not is_timeout(e)
            log.warning("%s: member %s did not take the %s notice (%s)%s", me.name, w.name,
                        "join" if is_join else "leave", str(e).splitlines()[0][:160],
                        "; it is gone" if dead else "; keeping it")
            if dead:
                failed.append(w)
    return failed


_settings = {"notify_timeout_s": 10.0, "token_timeout_s": 60.0, "stale_token_s": 30.0}
# How long a leaving member waits for its own calls still out and for members to take its notice.
# Both are courtesies: its calls are ones it abandoned (a fetch from a hung producer runs until
# the RPC timeout), and a member that misses the notice only keeps a stale entry (a later call to
# the departed member fails as a dead peer, which every caller handles). So a hung member delays
# a leave by seconds, not by the RPC timeout.
LEAVE_WAIT_S = 2.0


def _init_dynamic_backend(store, name, rank, world_size, rpc_backend_options):
    """`init_backend_handler` of MMDIT_TENSORPIPE: torch's dynamic TensorPipe join, fault tolerant."""
    from torch.distributed.rpc import TensorPipeAgent

    if world_size:
        raise ValueError("MMDIT_TENSORPIPE is for dynamic groups: call init_rpc without world_size")
    with _membership_token(store, name, "join", _settings["token_timeout_s"], _settings["stale_token_s"]):
        # CPU tensors only: batches cross the wire in host memory and the trainer moves them to its
        # GPU, so members need no device maps.
        agent = TensorPipeAgent(store, name, rank, None, rpc_backend_options, {}, [])
        rpc_api._init_rpc_states(agent)
        try:
            dead = _broadcast_membership(agent, True, _settings["notify_timeout_s"])
            for w in dead:
                agent._update_group_membership(w, [], {}, False)
            if dead:
                _prune_members(store, dead)
        except BaseException:
            rpc_api._finalize_shutdown()
            raise
    return agent


def _backend():
    if not backend_registry.backend_registered(BACKEND_NAME):
        backend_registry.register_backend(
            BACKEND_NAME, backend_registry._tensorpipe_construct_rpc_backend_options_handler, _init_dynamic_backend)
    return backend_registry.BackendType[BACKEND_NAME]


def join(name: str, host: str, port: int, *, rank: int | None = None, service_id: str = "",
         rpc_timeout_s: float = 60.0, join_timeout_s: float = 60.0, notify_timeout_s: float = 10.0,
         num_worker_threads: int = 16) -> int:
    """Join the group whose store is at host:port as `name`; rank 0 creates it (port 0: on any
    free port, see `hosted_port`) and records `service_id` in it; other ranks with a
    `service_id` join only a group that has it. Returns the rank.

    Peers on loopback talk over loopback (TP_SOCKET_IFNAME=lo unless set), so tests never depend
    on how this machine's hostname resolves.
    """
    if "-" in name:
        raise ValueError(f"RPC name {name!r} has a dash, which breaks torch's member list (use underscores)")
    if is_loopback(host):
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    _settings.update(notify_timeout_s=notify_timeout_s, token_timeout_s=join_timeout_s,
                     stale_token_s=max(2 * notify_timeout_s + 5.0, 10.0))
    try:
        if rank is None:
            rank = allocate_rank(host, port, join_timeout_s, service_id)
        # TCP (uv) only: TensorPipe's shared-memory transport, its default between processes of one
        # host, busy-polls a reactor thread at 100% of a core in every process, idle or not.
        opts = rpc.TensorPipeRpcBackendOptions(init_method=rendezvous_url(host, port), rpc_timeout=rpc_timeout_s,
                                               num_worker_threads=num_worker_threads, _transports=["uv"])
        rpc.init_rpc(name, backend=_backend(), rank=rank, rpc_backend_options=opts)
        if rank == 0 and service_id:
            _hosted_store().set(_SERVICE_ID, service_id)
    except (RuntimeError, ValueError, OSError) as e:  # c10d raises DistNetworkError/DistStoreError (RuntimeErrors)
        where = "host" if rank == 0 else "reach"
        raise RpcError(f"{name}: cannot {where} the data service's RPC group at {host}:{port} (service.host/"
                       f"service.port or service.address_from; is `mmdit serve` running?): "
                       f"{str(e).splitlines()[0][:300]}") from e
    return rank


def _drain(agent, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for this member's own calls to finish; False if some are still out."""
    deadline = time.monotonic() + timeout_s
    while int(agent.get_metrics()["agent.client_active_calls"]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def leave(graceful: bool = True, timeout_s: float = 10.0) -> bool:
    """Leave the group; True if the leave was graceful.

    Graceful: give this member's own calls still out a moment, take the membership token, tell
    the other members (each gets `LEAVE_WAIT_S`; dead ones are pruned), remove its name from the
    store. On any failure, and always when `graceful` is False, a local shutdown that waits for nobody.
    """
    if not rpc_api._is_current_rpc_agent_set():
        return False
    agent = rpc_api._get_current_rpc_agent()
    ok = False
    try:
        if graceful:
            me = agent.get_worker_info()
            wait_s = min(timeout_s, LEAVE_WAIT_S)
            if not _drain(agent, wait_s):
                log.info("%s: leaving with calls still out (to a hung member?): abandoned", me.name)
            with _membership_token(agent.store, me.name, "leave", timeout_s, _settings["stale_token_s"]):
                dead = _broadcast_membership(agent, False, min(wait_s, _settings["notify_timeout_s"]))
                # torch's own leave (agent.join) would wait for every call still out, however long
                _prune_members(agent.store, [*dead, me])
            ok = True
    except Exception as e:  # noqa: BLE001 - leaving must never hang or raise on a broken group
        log.warning("graceful RPC leave failed (%s); shutting down locally", str(e).splitlines()[0][:200])
    finally:
        rpc_api._finalize_shutdown()
    return ok


def members() -> list[str]:
    """Names of the members this process currently knows."""
    return sorted(w.name for w in rpc_api._get_current_rpc_agent().get_worker_infos())


def ensure_known(name: str, rank: int) -> None:
    """Make sure this process can call member `name` (rank `rank`), even if it missed its join notice."""
    agent = rpc_api._get_current_rpc_agent()
    if not any(w.name == name for w in agent.get_worker_infos()):
        agent._update_group_membership(rpc.WorkerInfo(name, rank), [], {}, True)



# ----------------------------------------------------------------------------- calls


def is_timeout(e: BaseException) -> bool:
    """A call that ran out of time (the peer may be alive), as opposed to a transport failure."""
    msg = str(e).lower()
    return "timed out" in msg or "timeout" in msg or "timeout" in type(e).__name__.lower()


def call(to: str, fn, *args, timeout_s: float, retries: int = 0, backoff_s: float = 0.05):
    """`rpc_sync(to, fn, args)` with a timeout; idempotent calls (retries > 0) retry timeouts.

    A transport failure (the peer is dead) is never retried: the caller must route around it.
    Raises RpcError naming the peer and the function.
    """
    for attempt in itertools.count():
        try:
            return rpc.rpc_sync(to, fn, args=args, timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - RPC raises RuntimeError subclasses of many kinds
            if attempt < retries and is_timeout(e):
                time.sleep(backoff_s * (2**attempt))
                continue
            raise RpcError(f"RPC {fn.__name__} to {to} failed: {str(e).splitlines()[0][:300]}") from e
