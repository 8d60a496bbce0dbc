"""Activation checkpointing policy: which parts of which blocks recompute in backward.

`full` checkpoints every block (only block inputs stay alive); `every_k` every k-th block;
`attention` / `mlp` keep the block but recompute only that sub-layer (selective recompute: the
attention scores or the 4x-wide MLP activations are the largest tensors); `elementwise`
checkpoints every block but keeps what is expensive to redo (matmul and attention outputs,
collectives), so backward re-runs only the cheap memory-bound ops: norms, modulation, RoPE,
GELU, gates. All use `torch.utils.checkpoint` in non-reentrant mode, which works on CPU and GPU
and needs no RNG tracker (the MMDiT has no dropout).
"""

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mmdit.config.parallel import ParallelConfig
from mmdit.model.mmdit import MMDiT


def _op(namespace, name: str, overload: str = "default"):
    """An op overload if this torch build has it (attention kernels differ per build)."""
    packet = getattr(namespace, name, None)
    return getattr(packet, overload, None) if packet is not None else None


def _kept_ops() -> set:
    aten = torch.ops.aten
    ops = {_op(aten, n) for n in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                  "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                                  "_efficient_attention_forward")}
    ops |= {_op(torch.ops._c10d_functional, n) for n in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor")}
    ops |= {_op(torch.ops.c10d, n) for n in ("allreduce_", "_allgather_base_", "_reduce_scatter_base_")}
    return ops - {None}


KEPT_OPS = _kept_ops()
"""Outputs `elementwise` keeps: matmuls, attention and collectives (re-running a collective in
backward would cost communication and could reorder it across ranks)."""


def _elementwise_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_recompute(model: MMDiT, policy: str, every: int = 2) -> None:
    """Set each block's checkpointing (the blocks apply it in their forward, compiled or not)."""
    context = partial(create_selective_checkpoint_contexts, _elementwise_policy) if policy == "elementwise" else None
    for index, block in enumerate(model.transformer_blocks):
        block.recompute_attention = policy == "attention"
        block.recompute_mlp = policy == "mlp"
        block.recompute_block = policy in ("full", "elementwise") or (policy == "every_k" and index % every == 0)
        block.recompute_context = context


def apply_recompute_config(model: MMDiT, cfg: ParallelConfig) -> None:
    apply_recompute(model, cfg.recompute, cfg.recompute_every)
