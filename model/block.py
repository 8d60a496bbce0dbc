"""The dual-stream MMDiT block: separate weights per stream, one joint attention.

Image and text tokens keep their own modulation, q/k/v, output projection and MLP; they meet
only in attention, over the joint sequence [text, image]. Under tensor parallelism q/k/v of
both streams are column-parallel, so each rank owns heads/tp whole heads of both streams and
attends locally; the output projections and the second MLP linear are row-parallel (one
all-reduce each). With sequence parallelism (model/sequence_parallel.py) the block's input and
output hold 1/tp of each stream's tokens: gathered before each column-parallel linear,
reduce-scattered after each row-parallel one. Module names equal diffusers'
`QwenImageTransformerBlock` except the fused q/k/v projections, which model/qkv.py maps to
diffusers' three per stream.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmdit.config.model import MMDiTArgs
from mmdit.model.attention import SDPAAttention
from mmdit.model.layers import HeadRMSNorm, LinearProvider, layer_norm, modulate
from mmdit.model.rope import apply_rotary
from mmdit.model.sequence_parallel import SequenceShards, StreamShards


class JointAttention(nn.Module):
    def __init__(self, args: MMDiTArgs, linears: LinearProvider, kernel=None):
        super().__init__()
        self.kernel = kernel or SDPAAttention()  # model/attention.py; holds no parameters
        dim, head_dim = args.hidden_size, args.attention_head_dim
        self.head_dim = head_dim
        self.local_heads = args.num_attention_heads // linears.tp_size
        # q, k, v of each stream in one column-parallel GEMM, rows head-major (model/qkv.py)
        self.to_qkv = linears.column(dim, 3 * dim)
        self.add_qkv_proj = linears.column(dim, 3 * dim)
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (
            HeadRMSNorm(head_dim, args.eps, linears.tp_group) for _ in range(4))
        self.to_out = nn.ModuleList([linears.row(dim, dim)])
        self.to_add_out = linears.row(dim, dim)

    def _qkv(self, proj: nn.Module, x: torch.Tensor, seq: SequenceShards) -> tuple[torch.Tensor, ...]:
        """q, k, v [B, S, H/tp, Dh] of this rank's heads over the whole stream."""
        return seq.column(proj, x).unflatten(-1, (self.local_heads, 3, self.head_dim)).unbind(dim=-2)

    def forward(self, img, txt, rope, padding, shards: StreamShards, text_output: bool = True):
        """img [B, N, D], txt [B, L, D] (modulated; this rank's chunks under sequence parallelism),
        padding from the kernel's `prepare` -> (img_out, txt_out | None), shaped as img and txt."""
        cos, sin = rope  # [L + N, Dh/2]
        txt_q, txt_k, txt_v = self._qkv(self.add_qkv_proj, txt, shards.txt)
        # The whole stream's length, read from the tensor (not the int in `shards`), so that a
        # compiled block keeps it symbolic: one graph for every prompt length (parallel/compile.py).
        txt_len = txt_q.shape[1]
        img_q, img_k, img_v = self._qkv(self.to_qkv, img, shards.img)
        q = torch.cat([self.norm_added_q(txt_q), self.norm_q(img_q)], dim=1)  # [B, L+N, H/tp, Dh]
        k = torch.cat([self.norm_added_k(txt_k), self.norm_k(img_k)], dim=1)
        v = torch.cat([txt_v, img_v], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.kernel(q, k, v, padding)  # [B, L+N, D/tp]
        img_out = self.to_out[0](out[:, txt_len:].contiguous())  # all-reduce (or reduce-scatter) over TP
        txt_out = self.to_add_out(out[:, :txt_len].contiguous()) if text_output else None
        return img_out, txt_out


class _GeluProjection(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, laid out as diffusers' FeedForward (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, hidden: int, linears: LinearProvider):
        super().__init__()
        self.net = nn.ModuleList([_GeluProjection(linears.column(dim, hidden)), nn.Identity(),
                                  linears.row(hidden, dim)])

    def forward(self, x: torch.Tensor, seq: SequenceShards) -> torch.Tensor:
        return self.net[2](F.gelu(seq.column(self.net[0].proj, x), approximate="tanh"))


class MMDiTBlock(nn.Module):
    def __init__(self, args: MMDiTArgs, linears: LinearProvider, text_output: bool = True, attention=None):
        super().__init__()
        dim = args.hidden_size
        self.eps = args.eps
        # Modulation: SiLU + Linear(dim -> 6*dim) per stream, a third of all parameters. Sharded by
        # output rows over TP and all-gathered: the output is per-sample [B, 6*dim], so tiny.
        self.img_mod = nn.Sequential(nn.SiLU(), linears.column_gathered(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), linears.column_gathered(dim, 6 * dim))
        self.attn = JointAttention(args, linears, attention)
        self.img_mlp = FeedForward(dim, args.mlp_hidden_size, linears)
        self.txt_mlp = FeedForward(dim, args.mlp_hidden_size, linears)
        # In the last block nothing reads the text stream's output: skip computing it, and freeze
        # the weights that only feed it (they can never get a gradient).
        self.text_output = text_output
        if not text_output:
            for p in [*self.attn.to_add_out.parameters(), *self.txt_mlp.parameters()]:
                p.requires_grad_(False)
        self.recompute_attention = False
        self.recompute_mlp = False
        self.recompute_block = False
        self.recompute_context = None
        """Checkpoint the whole block; `recompute_context` a `context_fn` (selective recompute).
        Inside `forward`, so that torch.compile of the block traces the checkpoint too."""

    def _attention(self, img, txt, img_mod1, txt_mod1, rope, padding, shards: StreamShards):
        img_shift, img_scale, _ = img_mod1.chunk(3, dim=-1)
        txt_shift, txt_scale, _ = txt_mod1.chunk(3, dim=-1)
        img_in = modulate(layer_norm(img, self.eps), img_shift, img_scale)
        txt_in = modulate(layer_norm(txt, self.eps), txt_shift, txt_scale)
        return self.attn(img_in, txt_in, rope, padding, shards, text_output=self.text_output)

    def _mlp(self, x, mod2, mlp, seq):
        shift, scale, _ = mod2.chunk(3, dim=-1)
        return mlp(modulate(layer_norm(x, self.eps), shift, scale), seq)

    def _maybe_checkpoint(self, enabled: bool, fn, *args):
        if enabled and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, img, txt, temb, rope, padding, shards: StreamShards):
        """img [B, N, D], txt [B, L, D], temb [B, D] -> (img, txt); txt is None in the last block.
        With sequence parallelism N and L are this rank's chunks of the streams (`shards`)."""
        if self.recompute_block and torch.is_grad_enabled():
            extra = {"context_fn": self.recompute_context} if self.recompute_context else {}
            return checkpoint(self._forward, img, txt, temb, rope, padding, shards, use_reentrant=False, **extra)
        return self._forward(img, txt, temb, rope, padding, shards)

    def _forward(self, img, txt, temb, rope, padding, shards):
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)  # [B, 3D] each: shift, scale, gate
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)

        img_attn, txt_attn = self._maybe_checkpoint(
            self.recompute_attention, self._attention, img, txt, img_mod1, txt_mod1, rope, padding, shards)
        img = img + img_mod1.chunk(3, dim=-1)[2].unsqueeze(1) * img_attn
        img = img + img_mod2.chunk(3, dim=-1)[2].unsqueeze(1) * self._maybe_checkpoint(
            self.recompute_mlp, self._mlp, img, img_mod2, self.img_mlp, shards.img)
        if not self.text_output:
            return img, None
        txt = txt + txt_mod1.chunk(3, dim=-1)[2].unsqueeze(1) * txt_attn
        txt = txt + txt_mod2.chunk(3, dim=-1)[2].unsqueeze(1) * self._maybe_checkpoint(
            self.recompute_mlp, self._mlp, txt, txt_mod2, self.txt_mlp, shards.txt)
        return img, txt
