"""The joint-attention kernel: one slot, three implementations (`parallel.attention`).

Like the linear-layer provider, this is the one place that decides how attention runs. A kernel
`prepare`s what it needs from the text mask once per forward (shared by every block), then takes
q, k, v as [B, S, H, Dh] over the joint sequence [text, image] and returns [B, S, H * Dh], so the
choice changes no parameter and no checkpoint.

- `sdpa`: torch's scaled_dot_product_attention. With no mask (the trainer trims text padding to
  the longest prompt of a micro-batch and passes no mask when nothing is left padded) it may take
  the flash or cuDNN kernel; with a mask, the memory-efficient or math kernel.
- `varlen`: each sample's valid tokens (its text prefix, then every image token) packed into one
  ragged batch and attended without a mask: torch's flash varlen kernel on CUDA in bf16/fp16,
  one SDPA call per sample elsewhere. Padded micro-batches keep the flash path.
- `te`: Transformer Engine's DotProductAttention (GPU only): `bshd` with no mask, `thd` with the
  same packing as `varlen` when text is padded.

Padded text positions get zero output from `varlen` and `te`. Nothing reads them: they are masked
as keys, so they never reach a valid token, and the loss covers image tokens only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmdit.config.parallel import ATTENTION_KERNELS


def joint_key_mask(txt_mask: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """[B, L] text mask -> [B, L + N] over the joint sequence (image tokens are always real)."""
    image = torch.ones(txt_mask.shape[0], num_image_tokens, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([txt_mask.bool(), image], dim=1)


@dataclass(frozen=True)
class TextPadding:
    """Which joint-sequence tokens are real in a micro-batch with padded prompts.

    Built once per forward (one host sync, for the lengths) and shared by every block.
    """

    index: torch.Tensor  # [T] positions of the real tokens in the flattened [B * S]
    cu_seqlens: torch.Tensor  # [B + 1] int32, offsets of each sample in the packed [T]
    lengths: tuple[int, ...]  # real tokens per sample (host side)

    @staticmethod
    def of(txt_mask: torch.Tensor | None, num_image_tokens: int) -> TextPadding | None:
        """txt_mask [B, L] (True = valid; valid tokens come first) -> the joint sequence's padding,
        or None when `txt_mask` is None (the caller decided on the host that nothing is padded)."""
        if txt_mask is None:
            return None
        key_mask = joint_key_mask(txt_mask, num_image_tokens)
        counts = key_mask.sum(dim=1)
        cu_seqlens = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        index = key_mask.flatten().nonzero().squeeze(1)
        return TextPadding(index, cu_seqlens, tuple(counts.tolist()))

    @property
    def max_len(self) -> int:
        return max(self.lengths)


def _sdpa_bshd(q, k, v, mask=None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


class SDPAAttention:
    """`prepare` gives a plain mask tensor (or None): a compiled block sees tensors only, so it
    does not recompile for every combination of prompt lengths."""

    name = "sdpa"

    @staticmethod
    def prepare(txt_mask: torch.Tensor | None, num_image_tokens: int) -> torch.Tensor | None:
        if txt_mask is None:
            return None
        return joint_key_mask(txt_mask, num_image_tokens)[:, None, None, :]  # [B, 1, 1, S] keys

    def __call__(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        return _sdpa_bshd(q, k, v, mask)


def _unpack(packed: torch.Tensor, padding: TextPadding, batch: int, seq: int) -> torch.Tensor:
    """[T, H, Dh] real tokens -> [B, S, H * Dh], zeros at padded positions."""
    full = packed.new_zeros(batch * seq, *packed.shape[1:]).index_copy(0, padding.index, packed)
    return full.view(batch, seq, -1)


def _pack(x: torch.Tensor, padding: TextPadding) -> torch.Tensor:
    return x.flatten(0, 1).index_select(0, padding.index)  # [T, H, Dh]


class VarlenAttention:
    name = "varlen"
    prepare = staticmethod(TextPadding.of)

    def __call__(self, q, k, v, padding: TextPadding | None) -> torch.Tensor:
        if padding is None:
            return _sdpa_bshd(q, k, v)
        batch, seq = q.shape[:2]
        q, k, v = (_pack(x, padding) for x in (q, k, v))
        if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            from torch.nn.attention.varlen import varlen_attn

            cu = padding.cu_seqlens
            out = varlen_attn(q, k, v, cu, cu, padding.max_len, padding.max_len)
        else:  # the same arithmetic, one sample at a time
            starts = itertools.accumulate(padding.lengths[:-1], initial=0)
            parts = [_sdpa_bshd(*(x.narrow(0, start, n).unsqueeze(0) for x in (q, k, v))).squeeze(0)
                     for start, n in zip(starts, padding.lengths)]
            out = torch.cat(parts).unflatten(-1, q.shape[1:])
        return _unpack(out, padding, batch, seq)


class TEAttention:
    """Transformer Engine's fused attention. Kept out of the module tree on purpose: TE modules
    add `_extra_state` entries to state dicts, which the diffusers layout has no place for."""

    name = "te"
    prepare = staticmethod(TextPadding.of)

    def __init__(self, local_heads: int, head_dim: int):
        import transformer_engine.pytorch as te

        self.kernel = te.DotProductAttention(local_heads, head_dim, attention_dropout=0.0, qkv_format="bshd",
                                             attn_mask_type="no_mask")

    def __call__(self, q, k, v, padding: TextPadding | None) -> torch.Tensor:
        if padding is None:
            return self.kernel(q, k, v, qkv_format="bshd", attn_mask_type="no_mask").flatten(2)
        batch, seq = q.shape[:2]
        cu = padding.cu_seqlens
        out = self.kernel(*(_pack(x, padding) for x in (q, k, v)), qkv_format="thd", attn_mask_type="padding",
                          cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=padding.max_len,
                          max_seqlen_kv=padding.max_len)
        return _unpack(out.reshape(out.shape[0], q.shape[2], -1), padding, batch, seq)


def resolve_attention(name: str) -> str:
    """`auto` is `sdpa`: it runs on every device and, with the trainer's padding trim, mostly
    without a mask; `varlen` and `te` are opt-in until a GPU benchmark says which is fastest."""
    from mmdit.model.layers import transformer_engine_available

    if name not in ATTENTION_KERNELS:
        raise ValueError(f"parallel.attention must be one of {ATTENTION_KERNELS}, got {name!r}")
    if name == "te" and not transformer_engine_available():
        raise ValueError("parallel.attention=te needs Transformer Engine on a GPU (`pip install -e .[gpu]`); "
                         "use sdpa or varlen")
    return "sdpa" if name == "auto" else name


def make_attention(name: str, local_heads: int, head_dim: int):
    if name == "te":
        return TEAttention(local_heads, head_dim)
    return {"sdpa": SDPAAttention, "varlen": VarlenAttention}[name]()
