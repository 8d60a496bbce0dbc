"""Activation checkpointing policy: which parts of which blocks recompute in backward.

`full` checkpoints every block (only block inputs stay alive); `every_k` every k-th block;
`attention` / `mlp` keep the block but recompute only that sub-layer (selective recompute: the
attention scores or the 4x-wide MLP activations are the largest tensors). All use
`torch.utils.checkpoint` in non-reentrant mode, which works on CPU and GPU and needs no RNG
tracker (the MMDiT has no dropout).
"""

from mmdit.model.mmdit import MMDiT
from mmdit.parallel.config import ParallelConfig


def apply_recompute(model: MMDiT, policy: str, every: int = 2) -> None:
    blocks = model.transformer_blocks
    model.recompute_blocks = set()
    for index, block in enumerate(blocks):
        block.recompute_attention = policy == "attention"
        block.recompute_mlp = policy == "mlp"
        if policy == "full" or (policy == "every_k" and index % every == 0):
            model.recompute_blocks.add(index)


def apply_recompute_config(model: MMDiT, cfg: ParallelConfig) -> None:
    apply_recompute(model, cfg.recompute, cfg.recompute_every)
