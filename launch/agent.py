"""`python -m mmdit.launch.agent [torchrun options] -m mmdit.launch.cli train ...`: torchrun, with
every listener on one address.

torch's own torchrun, on a cluster whose host names resolve to 127.0.0.1 (many images do):
- the c10d rendezvous store listens on `*:port` (TCPStore), and the node that should host it is
  recognized by comparing the endpoint with the host name's address, so an endpoint given as an
  IP is hosted by nobody;
- workers get MASTER_ADDR=`socket.getfqdn()` (`localhost`), the shared agent store listens on
  `*:port`, and gloo connects to 127.0.0.1 and hangs.

This module is torchrun (`torch.distributed.run`, same options) with:
- the `mmdit` rendezvous backend (`c10d` is taken for it): the same c10d rendezvous over a store
  that listens on the endpoint's address only (utils/store.py). A node hosts it when the endpoint
  is one of its interfaces' addresses (`--rdzv-conf=is_host=1|0` decides instead); an endpoint
  name that resolves to loopback on this node, though the rendezvous spans nodes, is an error
  that says so, never a store other nodes cannot reach;
- `--local-addr`, when not given, from the address model (utils/netaddr.py): the worker command's
  `service.advertise_host=`, else the local address of the route to the rendezvous endpoint. It
  is what the other nodes' workers get as MASTER_ADDR;
- the rendezvous store not shared with the workers (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: torch
  would host that one on `*:port`): rank 0 hosts the job's store on MASTER_ADDR
  (utils/store.join_process_group), and each rank's gloo listens on the interface of its route
  to it (or of service.advertise_host).

What torch still does: it picks MASTER_PORT by binding port 0 on `localhost` and closing it
(`get_free_port`): a port free on loopback, taken moments later on MASTER_ADDR by rank 0. It
listens nowhere else (no health-check server unless TORCHELASTIC_HEALTH_CHECK_PORT is set).
NCCL picks its own bootstrap interface: set NCCL_SOCKET_IFNAME on GPU clusters with several.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("mmdit.agent")

BACKEND = "mmdit"
DEFAULT_PORT = 29400


class RendezvousAddressError(RuntimeError):
    """The rendezvous endpoint cannot be hosted or reached as given; the message says why."""


def endpoint_role(host: str, max_nodes: int, is_host: bool | None) -> tuple[str, bool]:
    """(the address the store is at, whether this node hosts it) for endpoint `host`."""
    from mmdit.utils.netaddr import AddressError, interface_addresses, is_ip, is_loopback, resolve

    try:
        address = resolve(host)
    except AddressError as e:
        raise RendezvousAddressError(f"rendezvous endpoint: {e}") from None
    if is_loopback(address) and not is_loopback(host) and not is_ip(host) and max_nodes > 1:
        raise RendezvousAddressError(
            f"the rendezvous endpoint {host} resolves to {address} (loopback) on this node, so its store could not "
            f"be reached from the other {max_nodes - 1} nodes (this host's name is mapped to loopback, as on many "
            "cluster images): give the endpoint as the address of its node (--rdzv-endpoint=IP:PORT)")
    if is_host is None:
        is_host = is_loopback(address) or address in interface_addresses().values()
    return address, is_host


def _rendezvous_store(params):
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    from mmdit.utils.store import tcp_store

    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    timeout_s = float(params.get_as_int("read_timeout", 60))
    explicit = params.get_as_bool("is_host")
    address, is_host = endpoint_role(host, params.max_nodes, explicit)
    if is_host:
        try:
            store = tcp_store(address, port, server=True, timeout_s=timeout_s)
            log.info("hosting the rendezvous store on %s:%d", address, port)
            return store
        except (OSError, RuntimeError) as e:  # another agent of this machine hosts it already
            if explicit:
                raise RendezvousAddressError(f"cannot host the rendezvous store on {address}:{port}: {e}") from None
    return tcp_store(address, port, server=False, timeout_s=timeout_s)


def _create_handler(params):
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    class Backend(C10dRendezvousBackend):  # c10d's protocol, under its own name (torch checks it)
        @property
        def name(self) -> str:
            return BACKEND

    store = _rendezvous_store(params)
    return create_handler(store, Backend(store, params.run_id), params)


def register() -> None:
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry

    rendezvous_handler_registry.register(BACKEND, _create_handler)


def worker_setting(script_args: list[str], key: str) -> str:
    """The last `key=value` among the worker command's overrides ("" if none)."""
    value = ""
    for arg in script_args:
        if arg.startswith(f"{key}="):
            value = arg.split("=", 1)[1].strip("'\"")
    return value


def main(argv: list[str]) -> int:
    from torch.distributed.run import parse_args, run

    from mmdit.utils.netaddr import AddressError, advertised

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if args.rdzv_backend == "c10d":
        args.rdzv_backend = BACKEND
    if args.rdzv_backend == BACKEND:
        endpoint = args.rdzv_endpoint.rsplit(":", 1)[0].strip("[]") if args.rdzv_endpoint else "127.0.0.1"
        if not args.local_addr:
            try:
                where = advertised(worker_setting(args.training_script_args, "service.advertise_host"), endpoint)
            except AddressError as e:
                print(f"mmdit agent: {e}", file=sys.stderr)
                return 2
            args.local_addr = where.address
            log.info("this node is %s (%s)", where.address, where.how)
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        register()
    try:
        run(args)
    except RendezvousAddressError as e:
        print(f"mmdit agent: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
