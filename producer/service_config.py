"""Data-service settings: the coordinator, producer servers and the trainer-side client."""

from dataclasses import dataclass


@dataclass
class ServiceConfig:
    host: str = "127.0.0.1"
    port: int = 29600
    """Coordinator RPC store port (TensorPipe rank 0)."""
    producers: int = 1
    """Producers `mmdit serve` starts on this machine."""
    prefetch: int = 4
    """Batches the trainer-side client keeps in flight."""
    rpc_timeout_s: float = 60.0
