"""Weight initialization, identical at every TP size.

Each parameter's full tensor is drawn from a generator seeded by (seed, parameter name) and
each rank keeps its slice, so a TP=1 and a TP=8 model built with one seed are the same model.
As in DiT, the AdaLN modulation and the output head start at zero: every block starts as the
identity and the model's first prediction is zero.
"""

import zlib

import torch
import torch.nn as nn

from mmdit.model.sharding import diffusers_full_shapes, diffusers_partition_dims, local_from_parts, shard

ZERO_INIT = ("img_mod.", "txt_mod.", "norm_out.linear.", "proj_out.")


def _full_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # RMSNorm scales
        return torch.ones(shape)
    if any(tag in name for tag in ZERO_INIT):
        return torch.zeros(shape)
    fan_out, fan_in = shape
    bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier uniform on the full matrix
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Draw every tensor by its diffusers name (a fused q/k/v as its three parts)."""
    dims, shapes = diffusers_partition_dims(model), diffusers_full_shapes(model)

    def local_part(name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = _full_init(name, shapes[name], generator)
        return shard(full, dims[name], model.tp_rank, model.tp_size)

    for name, p in model.named_parameters():
        p.copy_(local_from_parts(model, name, local_part).to(p.dtype))
