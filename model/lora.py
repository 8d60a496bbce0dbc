"""LoRA on the tensor-parallel MMDiT: adapters split the way their base linear is split.

A targeted linear W gets `scale * B A x` added to its output (scale = alpha / rank), W frozen.
Under tensor parallelism the adapter follows its base, so each rank holds a fixed share of it and
the collectives stay small ([tokens, rank], never [tokens, hidden]):

    column-parallel base (q/k/v, MLP up, modulation)    A [r, in] replicated, B [out/tp, r] split
        h = A x on every rank; its gradient, partial (each rank's B sees its own outputs), is
        all-reduced over TP (megatron's copy-to-region on h), so A and x get the whole gradient
    row-parallel base (output projections, MLP down)    A [r, in/tp] split, B [out, r] replicated
        h = sum over ranks of A_rank x_rank (all-reduce of [tokens, r]), then B h

With sequence parallelism the column adapter sees this rank's tokens: h is computed on them and
all-gathered over the sequence (reduce-scattered in backward), and A's gradient, from this rank's
tokens only, is summed over TP; the row adapter reduce-scatters h, and B's gradient is summed.
The fused q/k/v projection (model/qkv.py) gets one adapter per q, k and v (diffusers' `to_q`,
`to_k`, `to_v` each have their own A and B), their outputs laid out head-major as the fused rows.

The adapter's parameters live in `<linear>.lora.<part>.lora_A|lora_B` ("base" for an unfused
linear, "to_q"... for a fused one); model/lora_io.py names them as diffusers/PEFT files do
(`transformer_blocks.0.attn.to_q.lora_A.weight`). `disabled(model)` runs the base model (the
reference of DPO and GRPO, at no extra weight memory); `merge` folds adapters into the weights.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel

from mmdit.config.lora import LoraConfig
from mmdit.model.layers import partition_dim
from mmdit.model.qkv import FUSED, fuse
from mmdit.model.sequence_parallel import SequenceShards

BASE = "base"
"""The part name of an unfused linear's adapter."""


class LoraWeights(nn.Module):
    """One adapter's A [r, in_local] and B [out_local, r] (split as the `kind` of base says)."""

    def __init__(self, kind: str, in_local: int, out_local: int, rank: int, dtype: torch.dtype):
        super().__init__()
        self.kind = kind
        self.lora_A = nn.Parameter(torch.empty(rank, in_local, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_local, rank, dtype=dtype))

    @property
    def lora_partition_dims(self) -> dict[str, int | None]:
        """model/layers.py `partition_dim` reads this: which dim of A and B is split over TP."""
        return {"lora_A": None, "lora_B": 0} if self.kind == "column" else {"lora_A": 1, "lora_B": None}


class LoraAdapter(nn.Module):
    """The adapter of one column- or row-parallel linear; `parts` are q/k/v of a fused projection
    (those targeted: a part not targeted contributes nothing) or the one `base` part."""

    def __init__(self, kind: str, parts: dict[str, LoraWeights], scale: float, dropout: float, tp_group,
                 fused_layout: tuple[int, int] | None = None, fused_parts: tuple[str, ...] = ()):
        super().__init__()
        self.kind, self.scale, self.tp_group = kind, scale, tp_group
        self.parts = nn.ModuleDict(parts)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fused_layout = fused_layout  # (local heads, head dim) of a fused q/k/v projection
        self.fused_parts = fused_parts  # its q, k, v names in row order (model/qkv.py FUSED)
        self.enabled = True
        """False inside `disabled(model)`: the linear is its base."""

    @property
    def _tp(self) -> bool:
        return self.tp_group is not None and self.tp_group.size() > 1

    def _replicated(self, w: torch.Tensor) -> torch.Tensor:
        """A replicated weight used on this rank's tokens only: its gradient is summed over TP."""
        return tensor_parallel.copy_to_tensor_model_parallel_region(w, group=self.tp_group) if self._tp else w

    def _down(self, x: torch.Tensor, replicate_a: bool = False) -> torch.Tensor:
        """h = A x of every part, concatenated [..., parts * r]."""
        x = self.dropout(x)
        weights = [p.lora_A for p in self.parts.values()]
        if replicate_a:
            weights = [self._replicated(w) for w in weights]
        return F.linear(x, torch.cat(weights) if len(weights) > 1 else weights[0])

    def _up(self, h: torch.Tensor, replicate_b: bool = False) -> torch.Tensor:
        """scale * B h of every part; for a fused projection, laid out as its head-major rows."""
        hs = h.chunk(len(self.parts), dim=-1)
        outs = {name: F.linear(hp, self._replicated(p.lora_B) if replicate_b else p.lora_B)
                for (name, p), hp in zip(self.parts.items(), hs)}
        if self.fused_layout is None:
            return outs[BASE] * self.scale
        heads, head_dim = self.fused_layout
        first = next(iter(outs.values()))
        stacked = torch.stack([outs[n] if n in outs else torch.zeros_like(first) for n in self.fused_parts], dim=-2)
        # [..., 3, H/tp * Dh] -> [..., H/tp, 3, Dh] -> head-major rows, as model/qkv.py fuses them
        return stacked.unflatten(-1, (heads, head_dim)).transpose(-3, -2).flatten(-3) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output for the base's input x (all tokens; a row base: its input split)."""
        h = self._down(x)
        if self._tp:
            region = (tensor_parallel.copy_to_tensor_model_parallel_region if self.kind == "column"
                      else tensor_parallel.reduce_from_tensor_model_parallel_region)
            h = region(h, group=self.tp_group)
        return self._up(h)

    def column_sequence_parallel(self, shard: torch.Tensor, seq: SequenceShards) -> torch.Tensor:
        """A column base under sequence parallelism: x is this rank's tokens; the output covers all."""
        return self._up(seq.gather(self._down(shard, replicate_a=True)))

    def row_sequence_parallel(self, x: torch.Tensor, seq: SequenceShards) -> torch.Tensor:
        """A row base under sequence parallelism: the output is this rank's tokens."""
        return self._up(seq.reduce_scatter(self._down(x)), replicate_b=True)


def _adaptable(module: nn.Module) -> str | None:
    """column | row for a tensor-parallel linear, else None."""
    if getattr(module, "weight", None) is None or not isinstance(module.weight, torch.Tensor):
        return None
    dim = partition_dim(module, "weight")
    return {0: "column", 1: "row"}.get(dim)


def diffusers_module_names(module_name: str) -> dict[str, str]:
    """Adapter part -> the diffusers module it adapts: `...attn.to_qkv` -> {"to_q": "...attn.to_q", ...}."""
    parent, _, leaf = module_name.rpartition(".")
    if leaf in FUSED:
        return {part: f"{parent}.{part}" if parent else part for part in FUSED[leaf]}
    return {BASE: module_name}


def matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _seeded_a(seed: int, name: str, rank: int, fan_in: int) -> torch.Tensor:
    """The full A of adapter `name`, as peft initializes it (kaiming-uniform, a = sqrt(5)), from a
    generator keyed by (seed, name): the same at every TP size."""
    key = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on [rank, fan_in]
    return torch.empty(rank, fan_in).uniform_(-bound, bound, generator=torch.Generator().manual_seed(key))


def adapters(model: nn.Module) -> Iterator[tuple[str, LoraAdapter]]:
    """(module name of the adapted linear, its adapter)."""
    for name, module in model.named_modules():
        if isinstance(module, LoraAdapter):
            yield name.removesuffix(".lora"), module


def has_lora(model: nn.Module) -> bool:
    return next(adapters(model), None) is not None


@torch.no_grad()
def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze every parameter of `model` and add adapters (A seeded, B zero: the model is still its
    base) to the linears `cfg.targets` names. Returns the adapted diffusers module names."""
    # Linears frozen before (the last block's text-only outputs, which no gradient reaches) get none.
    never_trained = {id(p) for p in model.parameters() if not p.requires_grad}
    # ... and so do the text queries of the last block (its text stream has no output), whose
    # fused base projection is trained for its keys and values.
    unused = {f"transformer_blocks.{i}.attn.add_q_proj" for i, block in enumerate(model.transformer_blocks)
              if not block.text_output}
    for p in model.parameters():
        p.requires_grad_(False)
    tp, tp_rank = model.tp_size, model.tp_rank
    adapted, found = [], []
    for module_name, module in list(model.named_modules()):
        kind = _adaptable(module)
        if kind is None or id(module.weight) in never_trained:
            continue
        names = diffusers_module_names(module_name)
        found += names.values()
        chosen = {part: name for part, name in names.items() if matches(name, cfg.targets) and name not in unused}
        if not chosen:
            continue
        out_local, in_local = module.weight.shape
        out_part = out_local // len(names)
        parts = {}
        for part, name in chosen.items():
            weights = LoraWeights(kind, in_local, out_part, cfg.rank, dtype).to(module.weight.device)
            full_in = in_local * (tp if kind == "row" else 1)
            a = _seeded_a(seed, name, cfg.rank, full_in)
            weights.lora_A.copy_(a.chunk(tp, dim=1)[tp_rank] if kind == "row" else a)
            parts[part] = weights
        layout = None
        if len(names) > 1:
            head_dim = model.args.attention_head_dim
            layout = (out_part // head_dim, head_dim)
        tp_group = getattr(module, "tp_group", None) or getattr(module, "_tp_group", None)  # local | TE layers
        module.lora = LoraAdapter(kind, parts, cfg.scale, cfg.dropout, tp_group, layout, tuple(names) if layout else ())
        adapted += chosen.values()
    unmatched = [p for p in cfg.targets if not any(matches(n, [p]) for n in found)]
    if unmatched:
        raise ValueError(f"train.lora.targets {unmatched} match no tensor-parallel linear (they are "
                         f"{sorted({n.split('.', 2)[-1] for n in found})} in each of transformer_blocks.N)")
    # What a LoRA checkpoint's index records (model/lora_io.py); parallelize adds the base weights.
    model.lora_info = {"rank": cfg.rank, "alpha": cfg.alpha or cfg.rank, "scale": cfg.scale,
                       "targets": list(cfg.targets), "modules": adapted, "base": "", "seed": seed}
    return adapted


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run `model` as its base, without adapters (the frozen reference of DPO and GRPO: no copy of
    the weights). Nothing to do for a model without adapters."""
    found = [a for _, a in adapters(model)]
    before = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield model
    finally:
        for a, was in zip(found, before):
            a.enabled = was


def local_delta(adapter: LoraAdapter, head_dim: int) -> torch.Tensor:
    """scale * B A of this rank's shard, shaped as the base weight's shard (fused rows head-major)."""
    deltas = {name: p.lora_B.float() @ p.lora_A.float() for name, p in adapter.parts.items()}
    if adapter.fused_layout is None:
        return deltas[BASE] * adapter.scale
    first = next(iter(deltas.values()))
    parts = [deltas.get(n, torch.zeros_like(first)) for n in adapter.fused_parts]
    return fuse(parts, head_dim) * adapter.scale


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (W += scale B A on each rank's shard) and remove it."""
    for name, adapter in list(adapters(model)):
        linear = model.get_submodule(name)
        linear.weight.add_(local_delta(adapter, model.args.attention_head_dim).to(linear.weight.dtype))
        del linear.lora
    model.lora_info = None  # a plain model again: its checkpoints hold every weight


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if ".lora." in n and n.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
