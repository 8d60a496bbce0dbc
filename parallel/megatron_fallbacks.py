"""Faster stand-ins for megatron-core's pure-torch fallbacks (used when neither Transformer
Engine nor apex is installed).

megatron's fallback gradient norm (`megatron.core.utils.local_multi_tensor_l2_norm`) builds a host
list of per-parameter norms, one device sync each (~1.9k per step at 60 blocks), and its scale
copies tensor by tensor. These do the same math with torch's multi-tensor `_foreach` kernels and
stay on the device. `install()` swaps them into `megatron.core.optimizer.clip_grads` only where
megatron fell back; with TE or apex megatron keeps its own fused kernels.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: ([1] fp32 norm of all tensors, None)."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install() -> bool:
    """Use the stand-ins where megatron fell back; True if it did."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is not utils.local_multi_tensor_l2_norm:
        return False
    clip_grads.l2_norm_impl = foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = foreach_scale
    return True
