"""Parallelism and memory settings of a training job."""

from dataclasses import dataclass

RECOMPUTE_POLICIES = ("none", "full", "every_k", "attention", "mlp", "elementwise")
BACKENDS = ("auto", "megatron", "torch")
ATTENTION_KERNELS = ("auto", "sdpa", "varlen", "te")


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: attention heads, MLPs and modulation linears split over tp ranks."""
    recompute: str = "none"
    """Activation checkpointing: none | full | every_k | attention | mlp | elementwise (parallel/recompute.py)."""
    recompute_every: int = 2
    """With recompute=every_k: checkpoint every k-th block (blocks 0, k, 2k, ...)."""
    compile: bool = False
    """torch.compile every transformer block (parallel/compile.py); first steps pay the compile time."""
    backend: str = "auto"
    """Data-parallel/optimizer backend. auto: megatron DDP + DistributedOptimizer on GPU,
    torch DDP + ZeroRedundancyOptimizer on CPU. Naming megatron on CPU is an error."""
    layers: str = "auto"
    """Linear layer implementation: auto (Transformer Engine when importable on GPU) | local | te."""
    attention: str = "auto"
    """Attention kernel (model/attention.py): auto (= sdpa) | sdpa | varlen (packed, no mask: flash
    for padded micro-batches) | te (Transformer Engine DotProductAttention, GPU)."""
    sequence_parallel: bool = False
    """With tp > 1: split norms, modulation and residuals over the TP group along the sequence
    (model/sequence_parallel.py), dividing their activation memory by tp for the same traffic.
    Uses the megatron-local linears (layers=auto picks them; layers=te is rejected)."""

    def __post_init__(self):
        if self.tp < 1:
            raise ValueError(f"parallel.tp must be >= 1, got {self.tp}")
        if self.recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"parallel.recompute must be one of {RECOMPUTE_POLICIES}, got {self.recompute!r}")
        if self.recompute_every < 1:
            raise ValueError(f"parallel.recompute_every must be >= 1, got {self.recompute_every}")
        if self.backend not in BACKENDS:
            raise ValueError(f"parallel.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"parallel.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.layers not in ("auto", "local", "te"):
            raise ValueError(f"parallel.layers must be auto, local or te, got {self.layers!r}")
        if self.sequence_parallel and self.layers == "te":
            raise ValueError("parallel.sequence_parallel=true needs parallel.layers=local or auto: Transformer "
                             "Engine's linears split the sequence along another dim")


def check_heads_divisible(heads: int, tp: int) -> None:
    """Each tensor-parallel rank owns whole attention heads."""
    if heads % tp:
        raise ValueError(f"parallel.tp={tp} must divide model.num_attention_heads={heads} (each tensor-parallel "
                         "rank owns whole heads)")
