"""Sequence parallelism: the activations between tensor-parallel regions split over the TP group.

Megatron's sequence parallelism, along the MMDiT's sequence dim (dim 1 of [B, S, D]; megatron's
own mappings split dim 0 of [S, B, D]). Outside attention and the MLPs (norms, modulation,
gates, residuals) each TP rank holds 1/tp of every stream's tokens instead of all of them: the
activation memory of those regions divides by tp, for the same traffic (the all-reduce after each
row-parallel linear becomes a reduce-scatter, and the column-parallel linears' input an
all-gather).

A stream of S tokens is padded to tp * ceil(S / tp); rank r holds tokens [r * chunk, (r + 1) *
chunk). The padding is cut off wherever the full sequence is rebuilt, so attention, RoPE and the
loss never see it, and it gets no gradient. (Qwen-Image's 1328x1328 bucket has 83 x 83 image
tokens: no TP size divides that.)

The operations, as autograd functions:

    scatter            replicated -> shard     backward: all-gather (the shard's gradient is complete)
    gather_replicated  shard -> replicated     backward: own chunk (every rank's gradient is the same)
    column             shard -> linear(full)   a column-parallel linear over the gathered sequence;
                                               saves the shard only and gathers again in backward, as
                                               megatron does; backward reduce-scatters the input
                                               gradient (each rank's is partial: its own columns)
    reduce_scatter     partial sums -> shard   backward: all-gather (after a row-parallel linear)
    gather             shard -> full           backward: reduce-scatter (each rank's consumer partial)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


def _padded(x: torch.Tensor, length: int) -> torch.Tensor:
    return x if x.shape[1] == length else F.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]))


# Functional (out-of-place) collectives: selective activation checkpointing can keep their
# outputs (an in-place collective mutates a tensor it has cached), and torch.compile traces them.
# Newer torch renames them (`*_single`); the GPU image's older torch has only the first names.
_gather_dim0 = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_dim0 = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _all_gather(shard: torch.Tensor, group, length: int) -> torch.Tensor:
    """[B, chunk, ...] on each rank -> [B, length, ...] (padding cut off)."""
    seq_first = shard.transpose(0, 1).contiguous()  # the collectives split dim 0 (free when B == 1)
    out = funcol.wait_tensor(_gather_dim0(seq_first, 0, group))
    return out.transpose(0, 1)[:, :length]


def _reduce_scatter(full: torch.Tensor, group, chunk: int) -> torch.Tensor:
    """[B, length, ...] partial sums on each rank -> this rank's [B, chunk, ...] of the sum."""
    seq_first = _padded(full, chunk * group.size()).transpose(0, 1).contiguous()
    out = funcol.wait_tensor(_reduce_scatter_dim0(seq_first, "sum", 0, group))
    return out.transpose(0, 1)


def _own_chunk(full: torch.Tensor, group, chunk: int) -> torch.Tensor:
    return _padded(full, chunk * group.size()).narrow(1, group.rank() * chunk, chunk).contiguous()


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, length, chunk):
        ctx.group, ctx.length = group, length
        return _own_chunk(x, group, chunk)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.length), None, None, None


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, length, chunk):
        ctx.group, ctx.chunk = group, chunk
        return _all_gather(x, group, length)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.group, ctx.chunk), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, length, chunk):
        ctx.group, ctx.length = group, length
        return _reduce_scatter(x, group, chunk)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.length), None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, length, chunk):
        ctx.group, ctx.chunk = group, chunk
        return _all_gather(x, group, length)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.chunk), None, None, None


class _GatherLinear(torch.autograd.Function):
    """A column-parallel linear over the gathered sequence that saves only this rank's shard of
    its input and gathers it again in backward (megatron's trade: one more all-gather for 1/tp of
    the memory); the input gradient is reduce-scattered back to the shard."""

    @staticmethod
    def forward(ctx, shard, weight, bias, group, length, chunk):
        ctx.group, ctx.length, ctx.chunk, ctx.has_bias = group, length, chunk, bias is not None
        ctx.save_for_backward(shard, weight)
        return F.linear(_all_gather(shard, group, length), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        shard, weight = ctx.saved_tensors
        full = _all_gather(shard, ctx.group, ctx.length)
        grad_input = _reduce_scatter(grad.matmul(weight), ctx.group, ctx.chunk)
        grad_weight = grad.flatten(0, -2).t().matmul(full.flatten(0, -2))
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None


@dataclass(frozen=True)
class SequenceShards:
    """One stream of `length` tokens split over `group`; with no group (or a group of one) every
    operation is the identity, so the model's code is the same with and without sequence parallelism."""

    length: int
    group: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.group is not None and self.group.size() > 1

    @property
    def chunk(self) -> int:
        return -(-self.length // self.group.size()) if self.enabled else self.length

    def _apply(self, fn, x: torch.Tensor) -> torch.Tensor:
        return fn.apply(x, self.group, self.length, self.chunk) if self.enabled else x

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, length, D], the same on every rank -> this rank's [B, chunk, D]."""
        return self._apply(_Scatter, x)

    def gather_replicated(self, x: torch.Tensor) -> torch.Tensor:
        """[B, chunk, D] -> [B, length, D] for a consumer that every rank computes alike."""
        return self._apply(_GatherReplicated, x)

    def column(self, linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`linear(gather(x))` for a column-parallel `linear`, keeping only the shard for backward."""
        if not self.enabled:
            return linear(x)
        out = _GatherLinear.apply(x, linear.weight, linear.bias, self.group, self.length, self.chunk)
        lora = getattr(linear, "lora", None)  # model/lora.py: its adapter, on this rank's tokens
        return out + lora.column_sequence_parallel(x, self) if lora is not None and lora.enabled else out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, chunk, D] -> [B, length, D] for a consumer that sees part of it per rank (its own
        columns): backward reduce-scatters the gradient. (A LoRA adapter's [B, chunk, rank].)"""
        return self._apply(_Gather, x)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, length, D] partial sums (a row-parallel linear's) -> this rank's [B, chunk, D] of the sum."""
        return self._apply(_ReduceScatter, x)


@dataclass(frozen=True)
class StreamShards:
    """The two streams of one forward: image tokens and text tokens."""

    img: SequenceShards
    txt: SequenceShards

    @staticmethod
    def of(num_image_tokens: int, num_text_tokens: int, group) -> StreamShards:
        return StreamShards(SequenceShards(num_image_tokens, group), SequenceShards(num_text_tokens, group))
