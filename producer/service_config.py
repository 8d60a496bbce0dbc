"""Data-service settings: the coordinator, producer servers and the trainer-side client."""

from dataclasses import dataclass


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 29600
    """Coordinator RPC store port (TensorPipe rank 0)."""
    producers: int = 1
    """Producers `mmdit serve` starts on this machine (0: a coordinator only; producers join from
    elsewhere with `python -m mmdit.producer.server`)."""
    prefetch: int = 4
    """Batches the trainer-side client keeps in flight."""
    fetch_threads: int = 1
    """Fetches a client runs at once, in plan order. One keeps batches arriving in order and off
    the trainer's cores; more help only when single transfers cannot fill the network."""
    ack_interval_s: float = 0.02
    """A client sends the acks of consumed batches this often, in one call."""
    rpc_timeout_s: float = 60.0
    """Default timeout of one RPC (a batch fetch included)."""
    fingerprint: str = ""
    """Encoder fingerprint whose cache entries are served; empty: the only one in the cache."""
    prepare_depth: int = 4
    """Batches a producer holds at once (leased, prepared ahead or served, not yet acked)."""
    plan_ahead: int = 64
    """Global batches the coordinator plans beyond the oldest unacknowledged one."""
    lease_timeout_s: float = 10.0
    """A producer silent for this long is declared dead and its leases go to the others."""
    heartbeat_s: float = 1.0
    """Longest a lease or locate call is held open at the coordinator when there is nothing new."""
    join_timeout_s: float = 60.0
    """Longest wait to join the RPC group (the coordinator may still be starting)."""
    consumer_timeout_s: float = 60.0
    """A client that gets no batch for this long (no producer alive, coordinator gone) fails."""
    min_batch_size: int = 0
    """A group remainder smaller than this joins its group's last batch; 0: the DP size."""
    drop_last: bool = False
    """Drop group remainders so that every global batch is full (otherwise each selected sample
    is served exactly once per epoch, remainders in a smaller last batch of their group)."""
    simulate_encode_s: float = 0.0
    """Benchmarks: a producer spends this long more on every batch it prepares, like an encoder."""
    prepare_workers: int = 1
    """Threads per producer preparing batches."""
    dp_size: int = 1
    """Data-parallel ranks that consume (the plan's split); `mmdit consume` starts this many."""
    dp_rank: int = -1
    """`mmdit consume`: run only this DP rank (-1: start every rank as a local process)."""
    step_time_s: float = 0.0
    """`mmdit consume`: simulated compute time of one training step."""
    max_runtime_s: float = 0.0
    """`mmdit serve` stops by itself after this long (0: until SIGTERM/SIGINT)."""
    shutdown_timeout_s: float = 10.0
    """Longest wait for a process to stop before it is killed."""
    rpc_threads: int = 16
    """TensorPipe worker threads per process."""
    status_every_s: float = 1.0
    """The coordinator rewrites run.dir/service.json this often."""

    def __post_init__(self):
        if self.producers < 0:
            raise ValueError(f"service.producers must be >= 0, got {self.producers}")
        for name in ("prefetch", "fetch_threads", "prepare_depth", "plan_ahead", "prepare_workers", "dp_size",
                     "rpc_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"service.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ack_interval_s", "rpc_timeout_s", "lease_timeout_s", "heartbeat_s", "join_timeout_s",
                     "consumer_timeout_s", "shutdown_timeout_s", "status_every_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"service.{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_s >= self.lease_timeout_s:
            raise ValueError(f"service.heartbeat_s ({self.heartbeat_s}) must be < service.lease_timeout_s "
                             f"({self.lease_timeout_s}), or live producers would lose their leases")
        if self.prefetch > self.plan_ahead:
            raise ValueError(f"service.prefetch ({self.prefetch}) must be <= service.plan_ahead ({self.plan_ahead}): "
                             "a client cannot fetch batches the coordinator has not planned")
        if self.dp_rank >= self.dp_size:
            raise ValueError(f"service.dp_rank {self.dp_rank} must be < service.dp_size {self.dp_size}")
        if self.min_batch_size < 0 or self.simulate_encode_s < 0 or self.step_time_s < 0 or self.max_runtime_s < 0:
            raise ValueError("service.min_batch_size, simulate_encode_s, step_time_s, max_runtime_s must be >= 0")
