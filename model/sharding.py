"""Which parameters are split over tensor-parallel ranks, and how to cut or join them.

The full (unsharded) parameter set, named as in diffusers, is the lingua franca: weights are
initialized, converted and checkpointed as slices of it, so any TP size can read what another
wrote.
"""

import torch
import torch.nn as nn

from mmdit.model.layers import partition_dim
from mmdit.model.qkv import diffusers_names, fuse, to_diffusers


def partition_dims(model: nn.Module) -> dict[str, int | None]:
    """Parameter name -> the dim split over TP ranks (None: replicated on every rank)."""
    dims = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            dims[full] = partition_dim(module, param_name)
    return dims


def diffusers_partition_dims(model: nn.Module) -> dict[str, int | None]:
    """`partition_dims` under the names checkpoint files use (a fused q/k/v split into three)."""
    return {part: dim for name, dim in partition_dims(model).items() for part in diffusers_names(name)}


def local_from_parts(model: nn.Module, name: str, local_part) -> torch.Tensor:
    """This rank's tensor of parameter `name`, from `local_part(diffusers name)` (this rank's slice
    of that tensor), fusing q/k/v where the model holds them as one."""
    parts = [local_part(part) for part in diffusers_names(name)]
    return parts[0] if len(parts) == 1 else fuse(parts, model.args.attention_head_dim)


def shard(full: torch.Tensor, dim: int | None, rank: int, size: int) -> torch.Tensor:
    """This rank's contiguous slice of `full` along `dim` (the whole tensor when replicated)."""
    if dim is None or size == 1:
        return full
    if full.shape[dim] % size:
        raise ValueError(f"dim {dim} of shape {tuple(full.shape)} does not split over {size} ranks")
    return full.chunk(size, dim=dim)[rank]


def unshard(shards: list[torch.Tensor], dim: int | None) -> torch.Tensor:
    """Join the slices of all TP ranks (rank order); replicated tensors are taken from rank 0."""
    return shards[0] if dim is None or len(shards) == 1 else torch.cat(shards, dim=dim)


def full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Unsharded shape of every parameter of a TP-sharded model."""
    dims = partition_dims(model)
    shapes = {}
    for name, p in model.named_parameters():
        shape = list(p.shape)
        if dims[name] is not None:
            shape[dims[name]] *= model.tp_size
        shapes[name] = tuple(shape)
    return shapes


def diffusers_full_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """`full_shapes` under the names checkpoint files use."""
    meta = ((name, torch.empty(shape, device="meta")) for name, shape in full_shapes(model).items())
    return {name: tuple(t.shape) for name, t in to_diffusers(meta, model.args.attention_head_dim)}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy this rank's slice of each full tensor (diffusers names) into the model's parameters."""
    dims = diffusers_partition_dims(model)
    params = dict(model.named_parameters())
    missing = sorted(set(dims) - set(full))
    unexpected = sorted(set(full) - set(dims))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, p in params.items():
        if not all(part in full for part in diffusers_names(name)):
            continue
        local = local_from_parts(model, name, lambda part: shard(full[part], dims[part], model.tp_rank, model.tp_size))
        if local.shape != p.shape:
            raise ValueError(f"{name}: checkpoint slice {tuple(local.shape)} != parameter {tuple(p.shape)}")
        p.copy_(local.to(p.dtype))
