"""`parallel.compile`: torch.compile each transformer block (the trainer and bench/recompute.py alike).

Per block, as torchtitan does: the 60 blocks are nearly all of the cost and share one compiled
graph per shape, while the top level's data-dependent checks (image shapes, text padding) would
break the graph. Inductor fuses what eager runs as separate memory-bound kernels (LayerNorm,
modulation, RoPE, GELU, gates); activation checkpointing wraps the compiled blocks unchanged.

Shapes change from batch to batch: each bucket has its own image token count, and the trainer
trims text to the longest prompt of each micro-batch. Left to itself, dynamo compiles the first
shapes static and recompiles when one changes (then once more, dynamic), separately for the last
block (no text output) and for masked micro-batches; past `recompile_limit` (8 graphs per code
object) it silently runs the block eagerly for good. So the token dims (and the batch dim) are
marked dynamic from the first call: one graph serves every bucket and prompt length
(tests/test_compile_recompiles.py counts them).
"""

import torch

from mmdit.model.mmdit import MMDiT


class _TokenDimsDynamic:
    """Calls a compiled block with its sequence dims (and batch dim) marked dynamic.

    The block's arguments are (img [B, N, D], txt [B, L, D] | None, temb [B, D], rope (cos, sin)
    [L + N, Dh/2], padding (a [B, 1, 1, L + N] mask, the varlen kernel's packing, or None), shards).
    `maybe_mark_dynamic` lets dynamo specialize a dim that must be (a batch of one), without error.
    """

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, img, txt, temb, rope, padding, shards):
        mark = torch._dynamo.maybe_mark_dynamic
        for x in (img, txt):
            if isinstance(x, torch.Tensor):
                mark(x, 0)
                mark(x, 1)
        mark(temb, 0)
        for table in rope:
            mark(table, 0)
        if isinstance(padding, torch.Tensor):
            mark(padding, 0)
            mark(padding, padding.dim() - 1)
        return self.compiled(img, txt, temb, rope, padding, shards)


def compile_blocks(model: MMDiT, backend="inductor") -> None:
    """torch.compile each block; `backend` is torch.compile's (a cheaper one, e.g. "eager", lets a
    test count graphs without paying for code generation)."""
    for block in model.transformer_blocks:
        # What `nn.Module.compile()` does (the module keeps its parameters and names), with the
        # dims marked dynamic on the way in.
        block._compiled_call_impl = _TokenDimsDynamic(torch.compile(block._call_impl, backend=backend))
