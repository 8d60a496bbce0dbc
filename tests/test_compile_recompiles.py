"""parallel/compile.py: one compiled graph per kind of block serves every bucket and prompt length.

The trainer's micro-batches change shape all the time (a bucket per batch, text trimmed to the
longest prompt, padded or not); a recompile per batch would cost seconds each on a GPU and, past
dynamo's recompile limit, silently leave the blocks eager. Dynamo traces with a counting
backend that runs the graphs eagerly: the graphs are the ones inductor would get, without
generating code for them.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mmdit.config.loader import load_config
from mmdit.config.parallel import ParallelConfig
from mmdit.model.mmdit import pack_latents, packed_shape
from mmdit.parallel.compile import compile_blocks
from mmdit.parallel.parallelize import parallelize

# (latent height, latent width) -> 64, 96 and 256 image tokens; prompts of 7, 12 and 20 tokens
SHAPES = [((16, 16), 7), ((24, 16), 12), ((32, 32), 20)]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # no cache entries from other tests' compiled blocks
    yield
    torch._dynamo.reset()


def _step(model, args, latent_hw, text_len: int, masked: bool) -> None:
    g = torch.Generator().manual_seed(text_len)
    h, w = latent_hw
    img = pack_latents(torch.randn(2, args.latent_channels, h, w, generator=g))
    txt = torch.randn(2, text_len, args.joint_attention_dim, generator=g)
    mask = None
    if masked:  # the second prompt is shorter: padded, the attention masks its keys
        mask = torch.ones(2, text_len, dtype=torch.bool)
        mask[1, text_len // 2:] = False
    out = model(img, txt, mask, torch.rand(2, generator=g), [packed_shape(h, w)])
    assert out.shape == img.shape
    out.float().square().mean().backward()


@pytest.mark.slow  # inductor compiles the blocks for several shapes
@pytest.mark.usefixtures("fresh_dynamo")
def test_one_graph_per_block_kind_across_buckets_and_prompt_lengths():
    args = load_config(["model.num_layers=3"]).model
    model = parallelize(args, ParallelConfig(), seed=0).model.train()
    counter = CompileCounterWithBackend("eager")
    compile_blocks(model, backend=counter)

    _step(model, args, *SHAPES[0], masked=False)
    # blocks 0 and 1 share a graph; the last block (no text output, its text weights frozen) has its own
    assert counter.frame_count == 2
    _step(model, args, *SHAPES[0], masked=True)
    assert counter.frame_count == 4  # a mask is an input the unmasked graphs do not take: once more each
    for latent_hw, text_len in SHAPES[1:]:
        for masked in (False, True):
            _step(model, args, latent_hw, text_len, masked)
    assert counter.frame_count == 4, "a new image token count or prompt length recompiled the blocks"
