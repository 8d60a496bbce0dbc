"""c10d TCP stores that listen only on the address they are given.

torch's `TCPStore(is_master=True)` listens on every interface (`*:port`). Every store mmdit hosts
(the data service's RPC group, a job's process group) is created here instead: the server binds
a socket to the configured address itself and hands it to the store (`master_listen_fd`), so a
job started with `127.0.0.1` is reachable from this machine only, and one on a cluster from its
configured interface only.

`join_process_group` is how every trainer rank joins its job; `rendezvous_url` names the RPC
group's store for `rpc.init_rpc` (a `mmdit-tcp://` rendezvous handler, registered on import).
"""

from __future__ import annotations

import datetime
import os
import socket
from urllib.parse import parse_qs, urlparse

import torch.distributed as dist

from mmdit.utils.netaddr import advertised

_LISTENERS: list[socket.socket] = []  # the stores serve on these sockets: keep them open
SCHEME = "mmdit-tcp"


def _listener(host: str, port: int) -> socket.socket:
    if host in ("", "*", "0.0.0.0", "::"):
        raise OSError(f"a store must listen on one address, not on every interface ({host or 'empty'})")
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


def tcp_store(host: str, port: int, *, server: bool, timeout_s: float, world_size: int | None = None) -> dist.TCPStore:
    """A store at host:port; with `server`, this process hosts it, listening on `host` only."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if not server:
        return dist.TCPStore(host, port, world_size, False, timeout)
    sock = _listener(host, port)
    store = dist.TCPStore(host, port, world_size, True, timeout, wait_for_workers=False,
                          master_listen_fd=sock.fileno(), use_libuv=True)
    _LISTENERS.append(sock)
    return store


def join_process_group(backend: str, timeout_s: float = 600.0) -> None:
    """Join the job described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Rank 0 hosts the store
    on MASTER_ADDR, unless torchrun's agent already hosts it (TORCHELASTIC_USE_AGENT_STORE).

    gloo listens on the interface GLOO_SOCKET_IFNAME names; unless set (the local launcher sets
    `lo`, `mmdit train` the interface of service.advertise_host), on the one holding the local
    address of the route to MASTER_ADDR (utils/netaddr.py), never the host name's address."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = advertised("", host, "GLOO_SOCKET_IFNAME").interface
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = tcp_store(host, port, server=rank == 0 and not agent_store, timeout_s=timeout_s,
                      world_size=None if agent_store else world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def rendezvous_url(host: str, port: int) -> str:
    return f"{SCHEME}://{host}:{port}"


def _rendezvous(url: str, timeout: datetime.timedelta = datetime.timedelta(seconds=300), **_):
    parsed = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    rank = int(query.get("rank", -1))
    world = int(query.get("world_size", -1))
    store = tcp_store(parsed.hostname, parsed.port, server=rank == 0, timeout_s=timeout.total_seconds(),
                      world_size=None if world < 1 else world)
    yield store, rank, world
    raise RuntimeError(f"{SCHEME}:// rendezvous cannot run again")


def _register() -> None:
    try:
        dist.register_rendezvous_handler(SCHEME, _rendezvous)
    except RuntimeError:  # registered already (a re-imported module)
        pass


_register()
