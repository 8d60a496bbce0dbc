"""Which address a process advertises to its peers, and which interface its sockets use.

One rule for every listener a peer on another host must reach (the data service's TensorPipe
agents, gloo, the torchrun rendezvous): a process advertises

    the address it is given      an IP or a host name (`service.advertise_host`, `--local-addr`),
                                 an interface name (its first IPv4 address), or `route:HOST`;
    by default                   the local address of the route to its peer (the coordinator,
                                 the rendezvous host, the job's store host): the address that
                                 peer's packets come back to. For the coordinator: the address
                                 it binds.

and never what this machine's host name resolves to: on many cluster images it resolves to
127.0.0.1 (or 127.0.1.1), which another host can never reach.

torch takes the listening interface of TensorPipe and gloo by name (TP_SOCKET_IFNAME,
GLOO_SOCKET_IFNAME) and listens on that interface's first address, so an advertised address must
be the first IPv4 address of one of this machine's interfaces (a loopback address: `lo`); the
error says which ones there are. IPv4 only: torch takes an interface's first address, which is
its IPv4 one when it has both.

`python -m mmdit.launch.address HOST [SETTING]` prints the address this host advertises toward
HOST (the job script of `mmdit submit` asks a node for its own address this way).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

ROUTE = "route:"
_SIOCGIFADDR = 0x8915


class AddressError(ValueError):
    """An address this process cannot advertise; the message names the setting to change."""


@dataclass(frozen=True)
class Advertised:
    address: str
    """The IPv4 address peers reach this process at."""
    interface: str
    """The interface that holds it (what TP_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name)."""
    how: str
    """Where it came from, for messages ("the route to 10.0.0.1", "service.advertise_host=ib0")."""

    @property
    def loopback(self) -> bool:
        return is_loopback(self.address)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve(host: str) -> str:
    """The IPv4 address of `host` (an IP is itself): where this machine would connect to reach it."""
    if is_ip(host):
        return host
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (OSError, IndexError) as e:
        raise AddressError(f"cannot resolve the host name {host!r}: {e}") from None


def interface_addresses() -> dict[str, str]:
    """Each interface of this machine (its network namespace) with an IPv4 address: name -> its
    first IPv4 address, the one TensorPipe and gloo listen on when told the interface."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address (or down and unconfigured)
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def interface_of(address: str) -> str | None:
    """The interface whose first IPv4 address is `address` (loopback addresses: the loopback
    interface), or None."""
    interfaces = interface_addresses()
    for name, first in interfaces.items():
        if first == address:
            return name
    if is_loopback(address):
        return next((name for name, first in interfaces.items() if is_loopback(first)), None)
    return None


def route_source(peer: str) -> str:
    """The local address of the route to `peer` (a host name or an IP): what a socket connecting
    there would be bound to. No packet is sent (a UDP socket is only connected)."""
    target = resolve(peer)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a fresh socket: one route lookup
        try:
            s.connect((target, 9))
        except OSError as e:
            raise AddressError(f"no route from this host to {peer} ({e.strerror or e})") from None
        return s.getsockname()[0]


def advertised(setting: str, toward: str, key: str = "service.advertise_host") -> Advertised:
    """The address to advertise: `setting` (an address, a host name, an interface, `route:HOST`)
    when given, else the route to `toward`. Raises AddressError naming `key` when it is not an
    address TensorPipe and gloo can listen on here."""
    setting = setting.strip()
    interfaces = interface_addresses()
    if not setting:
        address, how = route_source(toward), f"the route to {toward}"
    elif setting.startswith(ROUTE):
        peer = setting[len(ROUTE):]
        address, how = route_source(peer), f"{key}={setting} (the route to {peer})"
    elif setting in interfaces:
        address, how = interfaces[setting], f"{key}={setting}"
    else:
        address, how = resolve(setting), f"{key}={setting}"
    interface = interface_of(address)
    if interface is None:
        listed = ", ".join(f"{n} {a}" for n, a in interfaces.items()) or "none"
        raise AddressError(f"{how}: {address} is not the first IPv4 address of an interface of this host "
                           f"(TensorPipe and gloo listen on one; here: {listed}): set {key} to one of them")
    if is_loopback(address):
        address = interfaces[interface]
    return Advertised(address, interface, how)
