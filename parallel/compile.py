"""`parallel.compile`: torch.compile each transformer block (the trainer and bench/recompute.py alike).

Per block, as torchtitan does: the 60 blocks are nearly all of the cost and share one compiled
graph per shape, while the top level's data-dependent checks (image shapes, text padding) would
break the graph. Inductor fuses what eager runs as separate memory-bound kernels (LayerNorm,
modulation, RoPE, GELU, gates); activation checkpointing wraps the compiled blocks unchanged.
"""

from mmdit.model.mmdit import MMDiT


def compile_blocks(model: MMDiT) -> None:
    for block in model.transformer_blocks:
        block.compile()
