"""Tensor-parallel building blocks: the linear-layer provider and the norms of the MMDiT.

One place decides which linear implementation the model gets (megatron-core's local
tensor-parallel layers, or Transformer Engine's when installed on a GPU); both keep the same
parameter names and shapes, so checkpoints do not depend on the choice.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig

from mmdit.model.args import MMDiTArgs


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
        return out


class ColumnLinear(_OutputOnly, tensor_parallel.ColumnParallelLinear):
    pass


class RowLinear(_OutputOnly, tensor_parallel.RowParallelLinear):
    pass


def _te_linears():
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    class TEColumnLinear(_OutputOnly, TEColumnParallelLinear):
        pass

    class TERowLinear(_OutputOnly, TERowParallelLinear):
        pass

    return TEColumnLinear, TERowLinear


def partition_dim(module: nn.Module, param_name: str) -> int | None:
    """The dimension along which `module.<param_name>` is split over tensor-parallel ranks."""
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
    """

    config: TransformerConfig
    tp_group: torch.distributed.ProcessGroup | None
    use_te: bool

    def _kwargs(self, bias: bool) -> dict:
        return dict(config=self.config, init_method=self.config.init_method, bias=bias,
                    skip_bias_add=False, is_expert=False, tp_group=self.tp_group)

    def column(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        cls = _te_linears()[0] if self.use_te else ColumnLinear
        return cls(in_features, out_features, gather_output=False, **self._kwargs(bias))

    def column_gathered(self, in_features: int, out_features: int) -> nn.Module:
        # TE's column-parallel linear cannot gather its output: always the local layer here.
        return ColumnLinear(in_features, out_features, gather_output=True, **self._kwargs(True))

    def row(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        cls = _te_linears()[1] if self.use_te else RowLinear
        return cls(in_features, out_features, input_is_parallel=True, **self._kwargs(bias))

    @property
    def tp_size(self) -> int:
        return self.config.tensor_model_parallel_size


def make_linear_provider(args: MMDiTArgs, tp_size: int, tp_group, *, use_te: bool = False,
                         params_dtype: torch.dtype = torch.float32, on_gpu: bool = False) -> LinearProvider:
    if args.num_attention_heads % tp_size:
        raise ValueError(
            f"parallel.tp={tp_size} must divide num_attention_heads={args.num_attention_heads} "
            "(each tensor-parallel rank owns whole heads)")
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=tp_size,
        params_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        # Weights are initialized by MMDiT.init_weights (identically for every TP size), or loaded.
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )
    return LinearProvider(config=config, tp_group=tp_group, use_te=use_te)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as diffusers' RMSNorm), with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x.float() * torch.rsqrt(variance + self.eps)
        return (x * self.weight.float()).to(dtype)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters (the AdaLN modulation supplies scale and shift)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
