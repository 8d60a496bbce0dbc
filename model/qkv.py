"""Fused q/k/v projections, and the map between them and diffusers' separate ones.

Each stream computes q, k and v with one column-parallel linear (`to_qkv`, `add_qkv_proj`): one
GEMM instead of three, and under tensor parallelism one all-reduce of the input gradient instead
of three. Its output rows are laid out head-major, [q, k, v of head 0, then of head 1, ...], so a
contiguous 1/TP chunk holds whole heads of all three at any TP size, and each rank's slice is
again head-major over its own heads.

Everything that meets diffusers' names (checkpoint files, initialization by name, conversion)
goes through `diffusers_names`, `fuse` and `unfuse`, so `to_q`/`to_k`/`to_v` and
`add_q_proj`/`add_k_proj`/`add_v_proj` are what files hold, exactly as before the fusion.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}


def diffusers_names(name: str) -> list[str]:
    """"…attn.to_qkv.weight" -> ["…attn.to_q.weight", "…attn.to_k.weight", "…attn.to_v.weight"];
    any other name -> [name]."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if leaf not in FUSED:
        return [name]
    return [f"{parent}.{part}.{param}" if parent else f"{part}.{param}" for part in FUSED[leaf]]


def fuse(parts: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """q, k, v rows [H * Dh, ...] each -> [H * 3 * Dh, ...], head-major."""
    return torch.stack([p.unflatten(0, (-1, head_dim)) for p in parts], dim=1).flatten(0, 2)


def unfuse(fused: torch.Tensor, head_dim: int) -> list[torch.Tensor]:
    """Inverse of `fuse`: [H * 3 * Dh, ...] -> q, k, v rows [H * Dh, ...]."""
    return [x.flatten(0, 1) for x in fused.unflatten(0, (-1, 3, head_dim)).unbind(1)]


def to_diffusers(named: Iterable[tuple[str, torch.Tensor]], head_dim: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Module-named tensors (full, or one TP rank's slices) -> diffusers-named ones."""
    for name, tensor in named:
        names = diffusers_names(name)
        if len(names) == 1:
            yield name, tensor
        else:
            yield from zip(names, unfuse(tensor, head_dim))
