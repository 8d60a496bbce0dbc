"""Tensor-parallel building blocks: the linear-layer provider and the norms of the MMDiT.

One place decides which linear implementation the model gets (megatron-core's local
tensor-parallel layers, or Transformer Engine's when installed on a GPU); both keep the same
parameter names and shapes, so checkpoints do not depend on the choice.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import check_heads_divisible
from mmdit.model.sequence_parallel import SequenceShards


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class _OutputOnly:
    """Megatron linears return (output, bias); the MMDiT always adds the bias inside the layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = super().forward(x)
        assert bias is None, "skip_bias_add must be False"
        lora = getattr(self, "lora", None)  # model/lora.py: an adapter, split as this layer is
        return out + lora(x) if lora is not None and lora.enabled else out


class ColumnLinear(_OutputOnly, tensor_parallel.ColumnParallelLinear):
    pass


class RowLinear(_OutputOnly, tensor_parallel.RowParallelLinear):
    def _forward_impl(self, input, weight, *args, **kwargs):
        # megatron's RowParallelLinear.forward passes tp_group=None (meaning its TP group), which
        # warns on rank 0 at every call: under torch.compile, a graph break in every block.
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim in forward; in backward, this rank's slice of the gradient:
    as it is when the consumer is replicated (every rank's gradient is the same), summed over
    the group first when each rank's consumer saw only its own tokens (sequence parallelism)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, partial_grad: bool) -> torch.Tensor:
        ctx.group, ctx.partial_grad = group, partial_grad
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.partial_grad:  # tiny ([B, 6 * hidden]): an all-reduce is as good as a reduce-scatter
            grad = grad.contiguous()
            torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.group.size(), dim=-1)[ctx.group.rank()].contiguous(), None, None


class GatheredColumnLinear(ColumnLinear):
    """Column-parallel weight, replicated output: [..., out/tp] per rank, all-gathered.
    `partial_grad`: the output's consumers are split over the TP group (sequence parallelism)."""

    partial_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.tp_group.size() == 1:
            return out
        return _GatherLastDim.apply(out, self.tp_group, self.partial_grad)


class SequenceParallelRowLinear(RowLinear):
    """Row-parallel linear whose output is reduce-scattered over the sequence (model/sequence_parallel.py)
    instead of all-reduced: [B, S, in/tp] -> this rank's [B, ceil(S/tp), out] of the sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = SequenceShards(x.shape[1], self.tp_group)
        out = seq.reduce_scatter(F.linear(x, self.weight))
        lora = getattr(self, "lora", None)  # model/lora.py
        if lora is not None and lora.enabled:
            out = out + lora.row_sequence_parallel(x, seq)
        if self.bias is None:
            return out
        # Each rank adds the bias to its own tokens only: its gradient is summed over the group.
        return out + tensor_parallel.copy_to_tensor_model_parallel_region(self.bias, group=self.tp_group)


def _te_linears():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    class TEColumnLinear(_OutputOnly, TEColumnParallelLinear):
        pass

    class TERowLinear(_OutputOnly, TERowParallelLinear):
        pass

    return TEColumnLinear, TERowLinear


def partition_dim(module: nn.Module, param_name: str) -> int | None:
    """The dimension along which `module.<param_name>` is split over tensor-parallel ranks."""
    if hasattr(module, "lora_partition_dims"):  # a LoRA adapter's A and B (model/lora.py)
        return module.lora_partition_dims[param_name]
    column = (tensor_parallel.ColumnParallelLinear,)
    row = (tensor_parallel.RowParallelLinear,)
    if transformer_engine_available():
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        column, row = column + (TEColumnParallelLinear,), row + (TERowParallelLinear,)
    if isinstance(module, column):
        return 0  # weight [out/tp, in], bias [out/tp]
    if isinstance(module, row):
        return 1 if param_name == "weight" else None  # bias is added after the all-reduce
    return None


@dataclass
class LinearProvider:
    """Builds column/row-parallel linears over one tensor-parallel group.

    `column` keeps its output split over ranks (each rank owns whole heads or MLP channels);
    `row` takes split input and all-reduces its output; `column_gathered` computes a split output
    and all-gathers it (used for the AdaLN modulation, whose [B, 6*hidden] output is tiny but whose
    weight is a third of the model).

    With `sequence_parallel`, a `column` layer is applied through `SequenceShards.column` (which
    gathers its input over the sequence and reduce-scatters the input gradient, so the layer has
    no all-reduce of its own) and `row` reduce-scatters its output over the sequence. Both are
    megatron-local layers whatever `use_te` says: TE's split dim 0 of [S, B, D], the MMDiT's
    tokens are dim 1 (the plan never pairs them: parallel/parallelize.py).
    """

    config: TransformerConfig
    tp_group: torch.distributed.ProcessGroup | None
    use_te: bool
    sequence_parallel: bool = False

    def _kwargs(self, bias: bool) -> dict:
        return dict(config=self.config, init_method=self.config.init_method, bias=bias,
                    skip_bias_add=False, is_expert=False, tp_group=self.tp_group)

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        if self.sequence_parallel:
            return ColumnLinear(in_features, out_features, gather_output=False, disable_grad_reduce=True,
                                **self._kwargs(bias))
        cls = _te_linears()[0] if self.use_te else ColumnLinear
        return cls(in_features, out_features, gather_output=False, **self._kwargs(bias))

    def column_gathered(self, in_features: int, out_features: int) -> nn.Module:
        # The local layer without megatron's gather_output (which allocates on CUDA) and TE's
        # (which has none): our all-gather works with gloo and NCCL alike.
        layer = GatheredColumnLinear(in_features, out_features, gather_output=False, **self._kwargs(True))
        layer.partial_grad = self.sequence_parallel
        return layer

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        cls = SequenceParallelRowLinear if self.sequence_parallel else _te_linears()[1] if self.use_te else RowLinear
        return cls(in_features, out_features, input_is_parallel=True, **self._kwargs(bias))

    @property
    def tp_size(self) -> int:
        return self.config.tensor_model_parallel_size


def make_linear_provider(args: MMDiTArgs, tp_size: int, tp_group, *, use_te: bool = False,
                         params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False) -> LinearProvider:
    check_heads_divisible(args.num_attention_heads, tp_size)
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=tp_size,
        params_dtype=params_dtype,
        # TE layers are allocated on the meta device (megatron's TE wrappers ignore
        # perform_initialization on the CPU-init path); local layers on the CPU/meta context.
        use_cpu_initialization=not use_te,
        init_model_with_meta_device=use_te,
        # Weights are initialized by MMDiT.init_weights (identically for every TP size), or loaded.
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )
    return LinearProvider(config=config, tp_group=tp_group, use_te=use_te, sequence_parallel=sequence_parallel)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as diffusers' RMSNorm), with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x, self.weight)

    def _normalize(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x.float() * torch.rsqrt(variance + self.eps)
        return (x * weight.float()).to(dtype)


class HeadRMSNorm(RMSNorm):
    """Per-head q/k RMSNorm: one weight replicated on all TP ranks, applied to each rank's own
    heads, so each rank sees only part of its gradient. Passing the weight through megatron's
    copy-to-TP-region (identity forward, all-reduce backward) sums it over the TP group."""

    def __init__(self, dim: int, eps: float, tp_group):
        super().__init__(dim, eps)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.tp_group is not None and self.tp_group.size() > 1:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight, group=self.tp_group)
        return self._normalize(x, weight)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters (the AdaLN modulation supplies scale and shift)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
