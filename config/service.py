"""Data-service settings, split by role.

On the command line every setting is one `service.*` key (one flat namespace that every stage
of a job shares, so `mmdit demo service.heartbeat_s=0.5` reaches the coordinator, the producers
and the trainers alike). In code each process takes only its role's settings:

    RpcSettings          joining the RPC group and calling: every role
    CoordinatorSettings  the plan window, leases and their timeouts, status file
    ProducerSettings     how many batches to hold and prepare ahead
    ClientSettings       prefetching, acks, and how long a trainer waits for data

`ServiceConfig` is their union plus what the local launchers (`mmdit serve`, `mmdit consume`)
read; `svc.role(ProducerSettings)` is the view a producer gets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar


@dataclass
class RpcSettings:
    host: str = "127.0.0.1"
    """Address of the coordinator's RPC store (TensorPipe rank 0): where clients reach it, and
    where the coordinator listens unless service.advertise_host says otherwise."""
    advertise_host: str = ""
    """The address this process listens on and gives its peers (the coordinator, producers,
    trainers): an IPv4 address or host name of this host, an interface name (its first address),
    or `route:HOST` (the local address of the route to HOST). Empty: the route to the
    coordinator (service.host, or the published address); for the coordinator, service.host.
    Never the host name's address, which is loopback on many cluster images."""
    port: int = 29600
    """Coordinator RPC store port. 0: any free one, which `mmdit serve` publishes in
    run.dir/address.json; clients then find it with service.address_from."""
    address_from: str = ""
    """A `mmdit serve` run dir (or its address.json): join the service at the address it published
    there, in place of service.host/service.port (a client waits for it as long as it would wait
    to join). `mmdit serve` itself ignores it."""
    rpc_timeout_s: float = 60.0
    """Default timeout of one RPC (a batch transfer included)."""
    join_timeout_s: float = 60.0
    """Longest wait to join the RPC group (the coordinator may still be starting)."""
    heartbeat_s: float = 1.0
    """Longest a long poll (lease, locate, fetch) is held open when there is nothing new: a
    producer is heard from, and a client re-checks where its batch is, at least this often."""
    shutdown_timeout_s: float = 10.0
    """Longest wait for a process (or an RPC leave) to stop before it is killed."""
    rpc_threads: int = 16
    """TensorPipe worker threads per process."""


@dataclass
class CoordinatorSettings(RpcSettings):
    plan_ahead: int = 64
    """Global batches the coordinator plans beyond the oldest one some DP rank still needs."""
    lease_timeout_s: float = 10.0
    """A producer silent for this long is declared dead and its leases go to the others."""
    min_batch_size: int = 0
    """A group remainder smaller than this joins its group's last batch; 0: the DP size."""
    drop_last: bool = False
    """Drop group remainders so that every global batch is full (otherwise each selected sample
    is served exactly once per epoch, remainders in a smaller last batch of their group)."""
    fingerprint: str = ""
    """Encoder fingerprint whose cache entries are served; empty: the only one in the cache."""
    status_every_s: float = 1.0
    """The coordinator rewrites run.dir/service.json this often."""
    control_host: str = ""
    """Address of the coordinator's HTTP control endpoint (hot-swap, metrics, dashboard).
    Empty: the address its RPC store listens on (127.0.0.1 by default; on a cluster the job
    network's, so `mmdit ctl` works from every node of the job). Never a wildcard."""
    control_port: int = 0
    """Its port (0: any free one; the URL is in run.dir/control.json)."""
    control_max_connections: int = 32
    """Connections the control endpoint serves at once, one thread each (a dashboard takes about
    six). When all are taken, a new one replaces the longest idle one, or is answered 503."""
    control_timeout_s: float = 10.0
    """A control connection must send a whole request, and take its answer, within this long;
    an idle or dripping one is closed."""


@dataclass
class ProducerSettings(RpcSettings):
    prepare_depth: int = 4
    """Batches a producer holds at once (leased, prepared ahead or served, not yet acked by every
    DP rank). A batch revoked from a dead producer is leased beyond this (see the coordinator)."""
    prepare_workers: int = 1
    """Threads per producer preparing batches."""
    simulate_encode_s: float = 0.0
    """Benchmarks: a producer spends this long more on every batch it prepares, like an encoder."""
    fingerprint: str = ""
    """Encoder fingerprint whose cache entries are served; empty: the only one in the cache."""


@dataclass
class ClientSettings(RpcSettings):
    prefetch: int = 4
    """Batches the trainer-side client keeps in flight."""
    fetch_threads: int = 1
    """Fetches a client runs at once, in plan order. One keeps batches arriving in order and off
    the trainer's cores; more help only when single transfers cannot fill the network."""
    ack_interval_s: float = 0.02
    """A client sends the acks of consumed batches this often, in one call."""
    consumer_timeout_s: float = 60.0
    """A client that gets no batch for this long (no producer alive, coordinator gone) fails."""


@dataclass
class ServiceConfig(CoordinatorSettings, ProducerSettings, ClientSettings):
    """Every `service.*` key: the role settings plus what the local launchers read."""

    producers: int = 1
    """Producers `mmdit serve` starts on this machine (0: a coordinator only; producers join from
    elsewhere with `mmdit producer`)."""
    dp_size: int = 1
    """Data-parallel ranks that consume (the plan's split); `mmdit consume` starts this many."""
    dp_rank: int = -1
    """`mmdit consume`: run only this DP rank (-1: start every rank as a local process)."""
    step_time_s: float = 0.0
    """`mmdit consume`: simulated compute time of one training step."""
    max_runtime_s: float = 0.0
    """`mmdit serve` stops by itself after this long (0: until SIGTERM/SIGINT)."""

    def __post_init__(self):
        for name in ("producers", "min_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"service.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prefetch", "fetch_threads", "prepare_depth", "plan_ahead", "prepare_workers", "dp_size",
                     "rpc_threads", "control_max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"service.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ack_interval_s", "rpc_timeout_s", "lease_timeout_s", "heartbeat_s", "join_timeout_s",
                     "consumer_timeout_s", "shutdown_timeout_s", "status_every_s", "control_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"service.{name} must be > 0, got {getattr(self, name)}")
        for name in ("simulate_encode_s", "step_time_s", "max_runtime_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"service.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"service.port must be in 1..65535, or 0 for any free one, got {self.port}")
        if not 0 <= self.control_port < 65536:
            raise ValueError(f"service.control_port must be in 0..65535, got {self.control_port}")
        if self.heartbeat_s >= self.lease_timeout_s:
            raise ValueError(f"service.heartbeat_s ({self.heartbeat_s}) must be < service.lease_timeout_s "
                             f"({self.lease_timeout_s}), or live producers would lose their leases")
        if self.prefetch > self.plan_ahead:
            raise ValueError(f"service.prefetch ({self.prefetch}) must be <= service.plan_ahead ({self.plan_ahead}): "
                             "a client cannot fetch batches the coordinator has not planned")
        if self.dp_rank >= self.dp_size:
            raise ValueError(f"service.dp_rank {self.dp_rank} must be < service.dp_size {self.dp_size}")

    def role(self, cls: type[R]) -> R:
        """The settings one role reads (RpcSettings, CoordinatorSettings, ...), copied out."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls)})


R = TypeVar("R", bound=RpcSettings)
