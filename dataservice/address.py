"""Where a running data service is: the address `mmdit serve` publishes in its run directory.

With `service.port=0` the coordinator's RPC store binds whatever free port the kernel gives it,
so two services on one machine can never collide (a port chosen beforehand may be taken by
someone else before it is bound, and a client started for one service can then join another).
`mmdit serve` writes the address it got to `run.dir/address.json` once it serves (atomically:
readers never see half a file) and removes it when it stops:

    {"host": ..., "port": ..., "rpc": "host:port", "control": URL, "service_id": ..., "pid": ..., "hostname": ...}

A client (a trainer, `mmdit consume`, a `mmdit producer` started by hand) finds it with
`service.address_from=RUN_DIR` (the service's run dir, or its address.json), which replaces
service.host/service.port; it waits for the file as long as it would wait to join. The file's
`service_id` is also in the store the coordinator hosts, and a client refuses a store whose id
differs: an address file left by a killed service whose port another service took since leads
nowhere, instead of into the wrong job.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from mmdit.config import ConfigError

ADDRESS_JSON = "address.json"


class ServiceUnreachable(RuntimeError):
    """No data service answers at the configured or published address."""


@dataclass(frozen=True)
class ServiceAddress:
    host: str
    port: int
    service_id: str = ""
    """The publishing service's id ("" for an address from service.host/service.port: not checked)."""
    source: str = ""
    """The address file it was read from, for messages ("" when configured)."""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (f" (published in {self.source})" if self.source else "")


def publish(run_dir: str | os.PathLike, address: ServiceAddress, control_url: str) -> Path:
    """Write run_dir/address.json for `address` (the coordinator's, with the port it got)."""
    from mmdit.utils.atomic import atomic_write_json

    path = Path(run_dir) / ADDRESS_JSON
    atomic_write_json(path, {"host": address.host, "port": address.port, "rpc": f"{address.host}:{address.port}",
                             "control": control_url, "service_id": address.service_id, "pid": os.getpid(),
                             "hostname": socket.gethostname()})
    return path


def withdraw(run_dir: str | os.PathLike, service_id: str) -> None:
    """Remove run_dir/address.json if it is still the one service `service_id` published."""
    path = Path(run_dir) / ADDRESS_JSON
    published = read_published(path)
    if published is not None and published.service_id == service_id:
        path.unlink(missing_ok=True)


def address_file(address_from: str) -> Path:
    """`service.address_from` as a file: a run dir's address.json, or the file itself."""
    path = Path(address_from)
    return path if path.name == ADDRESS_JSON else path / ADDRESS_JSON


def read_published(path: str | os.PathLike) -> ServiceAddress | None:
    """The address in `path`, or None while there is none (not yet published, or withdrawn)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(Path(path).read_text())
        return ServiceAddress(str(data["host"]), int(data["port"]), str(data["service_id"]), str(path))
    return None


def configured(settings) -> ServiceAddress | None:
    """service.host:service.port, or None when the address is to be read from a file."""
    if settings.address_from:
        return None
    if settings.port == 0:
        raise ConfigError("service.port=0 lets the coordinator pick its port, which it publishes in its run dir: "
                          "a client finds it with service.address_from=<the service's run.dir>")
    return ServiceAddress(settings.host, settings.port)


def resolve(settings, timeout_s: float) -> ServiceAddress:
    """The address a client joins: service.address_from's published one (waiting up to
    `timeout_s` for it to appear), else service.host:service.port."""
    address = configured(settings)
    if address is not None:
        return address
    path, deadline = address_file(settings.address_from), time.monotonic() + timeout_s
    while (address := read_published(path)) is None:
        if time.monotonic() > deadline:
            raise ServiceUnreachable(f"no data service address in {path} after {timeout_s:.0f} s: start `mmdit serve "
                                     f"run.dir={path.parent}` first, or check service.address_from")
        time.sleep(0.2)
    return address


def reach(settings, timeout_s: float) -> ServiceAddress:
    """The address a client joins, once something accepts connections there (a launcher checks
    this before it starts any rank). A published address is read again on each try, so a
    service restarted meanwhile is found at its new port."""
    deadline = time.monotonic() + timeout_s
    while True:
        address = resolve(settings, max(0.0, deadline - time.monotonic()))
        try:
            with socket.create_connection((address.host, address.port), timeout=1.0):
                return address
        except OSError as e:
            if time.monotonic() > deadline:
                hint = ("the service that published it may be gone" if address.source else
                        "start `mmdit serve` first, or check service.host and service.port")
                raise ServiceUnreachable(f"no data service at {address} ({e.strerror or e}): {hint}") from None
            time.sleep(0.2)
