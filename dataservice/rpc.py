"""TensorPipe RPC for the data service: join and leave a dynamic group, and make calls that fail.

The coordinator is rank 0 and hosts the group's TCPStore; producers and trainer clients join and
leave while the job runs, each under a name unique to its incarnation.

Addresses (utils/netaddr.py): every member listens on the one address it advertises:
`service.advertise_host` (an address, an interface or `route:HOST`), by default the local
address of the route to the coordinator; the coordinator on `service.advertise_host` or, by
default, `service.host`, where its store listens too. Never what the host name resolves to
(127.0.0.1 on many cluster images). TensorPipe is told the interface (TP_SOCKET_IFNAME) while
the agent starts, and the URL it publishes is checked against the advertised address.

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
under the membership protocol of dataservice/membership.py: a joiner calls nobody but the
coordinator, which admits it only if it can call it back at the address it advertises; a
process only ever adds or removes itself from the member list, so one misconfigured process
cannot break a running job; the membership token is always released, and broken if its holder
died. Ranks are unique per incarnation, drawn from a counter in the store.

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

from mmdit.dataservice import membership
from mmdit.utils.netaddr import AddressError, Advertised, advertised, route_source
from mmdit.utils.store import rendezvous_url

log = logging.getLogger("mmdit.rpc")

COORDINATOR = "coordinator"
"""The coordinator's RPC name: rank 0, the store host; one per job, so no incarnation suffix."""
BACKEND_NAME = "MMDIT_TENSORPIPE"
_RANK_COUNTER = "mmdit_rank_counter"
_SERVICE_ID = "mmdit_service_id"  # the coordinator's id, as published with its address (address.py)
_incarnations = itertools.count()


class RpcError(RuntimeError):
    """A data-service RPC that could not complete (peer dead, timeout, group unreachable)."""


class JoinRejected(RpcError):
    """This process cannot be a member as configured (the address it advertises): a config error;
    the message names the address and the key to set. The member list is as it was."""


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


def hosted_address() -> str:
    """The address the store this process hosts (rank 0) listens on: the one it advertises."""
    return _self["advertised"].address


def hosted_port() -> int:
    """The port of the store this process hosts (rank 0): the one the kernel gave it for port 0."""
    return int(_hosted_store().port)


# ----------------------------------------------------------------------------- membership

_settings = {"notify_timeout_s": 10.0, "token_timeout_s": 60.0}
# How long a leaving member waits for its own calls still out and for members to take its notice.
# Both are courtesies: its calls are ones it abandoned (a fetch from a hung producer runs until
# the RPC timeout), and a member that misses the notice only keeps a stale entry (a later call to
# the departed member fails as a dead peer, which every caller handles). So a hung member delays
# a leave by seconds, not by the RPC timeout.
LEAVE_WAIT_S = 2.0
_self: dict = {}  # this process as a member: name, rank, url, advertised (an Advertised)


def _admit_timeout_s() -> float:
    """A joiner's admission call: the coordinator calls it back within notify_timeout_s."""
    return 2 * _settings["notify_timeout_s"] + 5.0


def _stale_token_s() -> float:
    """A token held longer than a join can take (its admission call included) is a dead holder's."""
    return _admit_timeout_s() + 10.0


class _Member:
    """Runs dataservice/membership.py's operations for this process: the store, its agent."""

    def __init__(self, store, name: str, rank: int, backend_options, where: Advertised):
        self.store, self.name, self.rank, self.options, self.where = store, name, rank, backend_options, where
        self.agent = None

    def __call__(self, op: tuple):
        return getattr(self, f"_{op[0]}")(*op[1:])

    def _get(self, key: str) -> str | None:
        return self.store.get(key).decode() if self.store.check([key]) else None

    def _set(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def _cas(self, key: str, expected: str, desired: str) -> str:
        return self.store.compare_set(key, expected, desired).decode()

    def _wait(self, key: str, timeout_s: float) -> None:
        with contextlib.suppress(Exception):  # a timeout: the caller looks again
            self.store.wait([key], datetime.timedelta(seconds=timeout_s))

    def _now(self) -> float:
        return time.monotonic()

    def _agent(self) -> str:
        """Build and start this process's agent (it lists itself and publishes its URL)."""
        from torch.distributed.rpc import TensorPipeAgent

        # CPU tensors only: batches cross the wire in host memory and the trainer moves them to its
        # GPU, so members need no device maps.
        with _listening_on(self.where.interface):
            self.agent = TensorPipeAgent(self.store, self.name, self.rank, None, self.options, {}, [])
            rpc_api._init_rpc_states(self.agent)
        url = self._get(membership.addr_key(self.name)) or ""
        if membership.url_host(url) != self.where.address:
            raise JoinRejected(f"{self.name}: TensorPipe listens at {url}, not on the advertised {self.where.address} "
                               f"({self.where.how}): set service.advertise_host to an interface's first address")
        return url

    def _admit(self, url: str) -> str | None:
        admitter = self._get(membership.RANK0) or COORDINATOR  # rank 0, the store's host, admits
        coordinator_url = self._get(membership.addr_key(admitter)) or "?"
        try:
            why = route_problem(coordinator_url)
            if why is None:
                return rpc.rpc_sync(admitter, _admit, args=(self.name, self.rank, url), timeout=_admit_timeout_s())
        except Exception as e:  # noqa: BLE001 - any failure: the coordinator could not be asked
            why = str(e).splitlines()[0][:200]
        loopback = membership.is_loopback_url(coordinator_url) and not self.where.loopback
        raise JoinRejected(
            f"{self.name}: cannot reach the coordinator at {coordinator_url}, the address it advertises ({why})"
            + ("; it advertises a loopback address: set service.host (or service.advertise_host) of `mmdit "
               "serve` to an address of its host that this host can reach" if loopback else ""))

    def _notify_leave(self) -> None:
        _notify_leave(self.agent or rpc_api._get_current_rpc_agent(), LEAVE_WAIT_S)

    def _shutdown(self) -> None:
        if self.agent is not None and rpc_api._is_current_rpc_agent_set():
            rpc_api._finalize_shutdown()


@contextlib.contextmanager
def _listening_on(interface: str):
    """TensorPipe reads TP_SOCKET_IFNAME when its agent starts: set it for that moment only, so
    processes this one starts later decide their own."""
    before = os.environ.get("TP_SOCKET_IFNAME")
    os.environ["TP_SOCKET_IFNAME"] = interface
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TP_SOCKET_IFNAME", None)
        else:
            os.environ["TP_SOCKET_IFNAME"] = before


def route_problem(url: str) -> str | None:
    """Why this host has no route to the host of TensorPipe URL `url`, or None. Asked before
    TensorPipe first connects anywhere that may be unreachable: its transport aborts the whole
    process when the kernel fails a connection at once (no route to the network), and reports
    only a refusal or a timeout, which come later. The check sends nothing: a connection that
    TensorPipe's listener does not complete as a pipe makes it stop accepting (torch 2.13)."""
    try:
        route_source(membership.url_host(url) or "?")
        return None
    except AddressError as e:
        return str(e)


def _unroutable(store, name: str) -> bool:
    key = membership.addr_key(name)
    return not store.check([key]) or route_problem(store.get(key).decode()) is not None


def _whoami() -> str:
    """Called by the coordinator on a joiner it admits: who listens at the address it gave."""
    return rpc.get_worker_info().name


def _admit(name: str, rank: int, url: str) -> str | None:
    """Runs on the coordinator, called by a joiner: None to admit it, else why not (see
    membership.admission_problem). The coordinator calls it back at `url` first."""
    agent = rpc_api._get_current_rpc_agent()
    own_url = _self.get("url", "")
    answered, error = None, None
    if not (membership.is_loopback_url(url) and not membership.is_loopback_url(own_url)):
        error = route_problem(url)  # TensorPipe only where there is a route
        if error is None:
            try:
                _learn(agent, name, rank)
                answered = rpc.rpc_sync(name, _whoami, timeout=_settings["notify_timeout_s"])
            except Exception as e:  # noqa: BLE001 - any failure: not reachable as it says
                error = str(e).splitlines()[0][:200]
    problem = membership.admission_problem(name, url, own_url, answered, error)
    if problem is None:
        log.info("admitted %s (rank %d) at %s", name, rank, url)
    else:
        log.warning("rejected %s (rank %d): %s", name, rank, problem)
        with contextlib.suppress(Exception):  # forget it: it never became a member
            agent._update_group_membership(rpc.WorkerInfo(name, rank), [], {}, False)
    return problem


def _notify_leave(agent, timeout_s: float) -> None:
    """Tell every other member, concurrently, that this one leaves (a courtesy: a member that
    misses it keeps a stale entry, and a later call to it fails as a dead peer)."""
    me = agent.get_worker_info()
    futures = []
    for w in agent.get_worker_infos():
        if w.name == me.name or (w.name not in _reachable and _unroutable(agent.store, w.name)):
            continue
        with contextlib.suppress(Exception):  # one we cannot even send to is gone
            futures.append(rpc.rpc_async(w.name, _update_group_membership, args=(me, [], {}, False),
                                         timeout=timeout_s))
    for fut in futures:
        with contextlib.suppress(Exception):
            fut.wait()


def _init_dynamic_backend(store, name, rank, world_size, rpc_backend_options):
    """`init_backend_handler` of MMDIT_TENSORPIPE: a join under dataservice/membership.py."""
    if world_size:
        raise ValueError("MMDIT_TENSORPIPE is for dynamic groups: call init_rpc without world_size")
    member = _Member(store, name, rank, rpc_backend_options, _self["advertised"])
    steps = membership.join(name, rank, _settings["token_timeout_s"], _stale_token_s(),
                            admitted_by_coordinator=rank != 0)
    _self["url"] = membership.run(steps, member)
    return member.agent


def _backend():
    if not backend_registry.backend_registered(BACKEND_NAME):
        backend_registry.register_backend(
            BACKEND_NAME, backend_registry._tensorpipe_construct_rpc_backend_options_handler, _init_dynamic_backend)
    return backend_registry.BackendType[BACKEND_NAME]


def join(name: str, host: str, port: int, *, rank: int | None = None, service_id: str = "",
         advertise_host: str = "", rpc_timeout_s: float = 60.0, join_timeout_s: float = 60.0,
         notify_timeout_s: float = 10.0, num_worker_threads: int = 16) -> int:
    """Join the group whose store is at host:port as `name`; rank 0 creates it (port 0: on any
    free port, see `hosted_port`) and records `service_id` in it; other ranks with a
    `service_id` join only a group that has it. Returns the rank.

    The member listens on `advertise_host` (utils/netaddr.py: an address, an interface or
    `route:HOST`), by default on the local address of the route to `host`; rank 0 on
    `advertise_host` or `host`, where its store listens too. Raises JoinRejected when that
    address cannot serve (not this host's, or the coordinator cannot call it back there).
    """
    if "-" in name:
        raise ValueError(f"RPC name {name!r} has a dash, which breaks torch's member list (use underscores)")
    _settings.update(notify_timeout_s=notify_timeout_s, token_timeout_s=join_timeout_s)
    try:
        if rank == 0:
            where = advertised(advertise_host or host, host, "service.advertise_host" if advertise_host else "service.host")
            host = where.address
        else:
            where = advertised(advertise_host, host)
    except AddressError as e:
        raise JoinRejected(f"{name}: {e}") from None
    _self.update(name=name, advertised=where)
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
    except membership.Rejected as e:
        raise JoinRejected(f"{name}: the coordinator rejected this process: {e}; it advertised {where.address} "
                           f"({where.how}): set service.advertise_host to an address of this host that the "
                           "coordinator's host can reach") from None
    except JoinRejected:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # c10d raises DistNetworkError/DistStoreError (RuntimeErrors)
        where_ = "host" if rank == 0 else "reach"
        raise RpcError(f"{name}: cannot {where_} the data service's RPC group at {host}:{port} (service.host/"
                       f"service.port or service.address_from; is `mmdit serve` running?): "
                       f"{str(e).splitlines()[0][:300]}") from e
    _self["rank"] = rank
    log.info("%s (rank %d) listens at %s (%s)", name, rank, _self["url"], where.how)
    return rank


def advertised_url() -> str:
    """The URL this process's agent listens at (empty before it joined)."""
    return _self.get("url", "")


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
    the other members (each gets `LEAVE_WAIT_S`), take its own name off the store's member list.
    On any failure, and always when `graceful` is False, a local shutdown that waits for nobody.
    """
    if not rpc_api._is_current_rpc_agent_set():
        return False
    agent = rpc_api._get_current_rpc_agent()
    ok = False
    try:
        if graceful:
            me = agent.get_worker_info()
            if not _drain(agent, min(timeout_s, LEAVE_WAIT_S)):
                log.info("%s: leaving with calls still out (to a hung member?): abandoned", me.name)
            # torch's own leave (agent.join) would wait for every call still out, however long
            member = _Member(agent.store, me.name, me.id, None, _self.get("advertised"))
            member.agent = agent
            membership.run(membership.leave(me.name, me.id, timeout_s, _stale_token_s()), member)
            ok = True
    except Exception as e:  # noqa: BLE001 - leaving must never hang or raise on a broken group
        log.warning("graceful RPC leave failed (%s); shutting down locally", str(e).splitlines()[0][:200])
    finally:
        rpc_api._finalize_shutdown()
        _self.clear()
        _reachable.clear()
    return ok


def members() -> list[str]:
    """Names of the members this process currently knows."""
    return sorted(w.name for w in rpc_api._get_current_rpc_agent().get_worker_infos())


def listed_members() -> list[str]:
    """The group's member list in the store ("name-rank" entries): what the next joiner starts from."""
    store = rpc_api._get_current_rpc_agent().store
    return membership.entries(store.get(membership.LIST).decode() if store.check([membership.LIST]) else "")


_reachable: set[str] = set()  # members this process found a route to


def ensure_known(name: str, rank: int) -> None:
    """Make sure this process can call member `name` (rank `rank`): known to its agent (a member
    that joined after this one is not), and with a route from here to it (checked once per
    member; see `route_problem`). Raises RpcError when there is none."""
    agent = rpc_api._get_current_rpc_agent()
    if name not in _reachable:
        url = agent.store.get(membership.addr_key(name)).decode() if agent.store.check(
            [membership.addr_key(name)]) else ""
        why = route_problem(url) if url else "no address published"
        if why is not None:
            raise RpcError(f"cannot connect to {name} at {url or '?'}: {why}")
        _reachable.add(name)
    _learn(agent, name, rank)


def _learn(agent, name: str, rank: int) -> None:
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
