"""The Qwen-Image MMDiT: input embeddings, dual-stream blocks, AdaLN output head.

Parameter names equal diffusers' `QwenImageTransformer2DModel` (see model/state_dict.py). Build
it through `build_mmdit`, which picks the linear implementation and the tensor-parallel group;
the model itself is the same code at every TP size.
"""

import math

import torch
import torch.nn as nn

from mmdit.config.model import MMDiTArgs
from mmdit.model.attention import SDPAAttention, make_attention
from mmdit.model.block import MMDiTBlock
from mmdit.model.layers import LinearProvider, RMSNorm, layer_norm, make_linear_provider, modulate
from mmdit.model.rope import ImageShape, msrope
from mmdit.model.sequence_parallel import StreamShards


def timestep_sinusoids(sigmas: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """[B] noise levels in [0, 1] -> [B, dim] (cos, sin) features of sigma*scale (flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=sigmas.device) / half)
    angles = scale * sigmas.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, in_channels: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """Named as diffusers' `QwenTimestepProjEmbeddings` (`time_text_embed.timestep_embedder`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, sigmas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_sinusoids(sigmas).to(dtype))


class AdaNormOut(nn.Module):
    """Final AdaLN: LayerNorm, then scale and shift (in that order) from the timestep embedding."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(temb)).chunk(2, dim=-1)
        return modulate(layer_norm(x, self.eps), shift, scale)


class MMDiT(nn.Module):
    def __init__(self, args: MMDiTArgs, linears: LinearProvider, tp_rank: int = 0, attention=None,
                 sequence_parallel_group=None):
        super().__init__()
        self.args = args
        self.kernel = attention or SDPAAttention()  # model/attention.py, shared by every block
        self.attention = self.kernel.name
        self.tp_size, self.tp_rank = linears.tp_size, tp_rank
        # model/sequence_parallel.py: the blocks' activations split over this group (the TP group)
        self.sequence_parallel_group = sequence_parallel_group
        self.config = linears.config  # megatron's TransformerConfig: its DDP reads it
        dim = args.hidden_size
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(args.joint_attention_dim, args.eps)
        self.img_in = nn.Linear(args.in_channels, dim)
        self.txt_in = nn.Linear(args.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([
            MMDiTBlock(args, linears, text_output=i < args.num_layers - 1, attention=self.kernel)
            for i in range(args.num_layers)
        ])
        self.norm_out = AdaNormOut(dim, args.eps)
        self.proj_out = nn.Linear(dim, args.patch_size**2 * args.out_channels)

    def forward(self, img_tokens: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor | None,
                sigmas: torch.Tensor, image_shapes: list[ImageShape]) -> torch.Tensor:
        """Predict the flow velocity of every image token.

        img_tokens [B, N, C*p*p]: packed target tokens, then condition-image tokens (edit);
        txt [B, L, joint_dim] condition-encoder states; txt_mask [B, L] bool (True = valid);
        sigmas [B] noise levels in [0, 1]; image_shapes: (frames, rows, cols) in packed tokens of
        each image in the sequence, shared by the whole batch. Returns [B, N, C*p*p].
        """
        if sum(f * h * w for f, h, w in image_shapes) != img_tokens.shape[1]:
            raise ValueError(f"image_shapes {image_shapes} do not cover {img_tokens.shape[1]} image tokens")
        img = self.img_in(img_tokens)  # [B, N, D]
        txt = self.txt_in(self.txt_norm(txt))  # [B, L, D]
        temb = self.time_text_embed(sigmas, img.dtype)  # [B, D]
        rope = msrope(image_shapes, txt.shape[1], list(self.args.axes_dims_rope), self.args.rope_theta,
                      device=img.device)  # (cos, sin) [L + N, Dh/2]
        # The kernel's view of the padded text; None when nothing is padded (decided on the host,
        # no device sync), so attention can take its unmasked flash kernels.
        padding = self.kernel.prepare(txt_mask, img.shape[1])

        shards = StreamShards.of(img.shape[1], txt.shape[1], self.sequence_parallel_group)
        img, txt = shards.img.scatter(img), shards.txt.scatter(txt)
        for block in self.transformer_blocks:  # each checkpoints itself as parallel/recompute.py set it
            img, txt = block(img, txt, temb, rope, padding, shards)
        img = shards.img.gather_replicated(img)  # the output head and the loss see every token
        return self.proj_out(self.norm_out(img, temb))  # [B, N, C*p*p]


def pack_latents(latents: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/p)*(w/p), C*p*p], the token layout of diffusers' `_pack_latents`."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of pack_latents: [B, (h/p)*(w/p), C*p*p] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def packed_shape(latent_h: int, latent_w: int, patch: int = 2) -> ImageShape:
    return (1, latent_h // patch, latent_w // patch)


def build_mmdit(args: MMDiTArgs, tp_group=None, *, device: str | torch.device = "cpu",
                use_te: bool = False, params_dtype: torch.dtype = torch.float32, attention: str = "sdpa",
                sequence_parallel: bool = False) -> MMDiT:
    """Build this rank's shard of the MMDiT with uninitialized weights on `device` ("meta" too).

    Call `init_weights` (model/init.py) or load a checkpoint afterwards. tp_group None means TP=1.
    The choices come resolved (parallel/parallelize.py's plan): `sequence_parallel` is taken as
    given, and reaches the linears and the model from here.
    """
    tp_size = tp_group.size() if tp_group is not None else 1
    tp_rank = tp_group.rank() if tp_group is not None else 0
    linears = make_linear_provider(args, tp_size, tp_group, use_te=use_te, params_dtype=params_dtype,
                                   sequence_parallel=sequence_parallel)
    kernel = make_attention(attention, args.num_attention_heads // tp_size, args.attention_head_dim)
    with torch.device("meta"):
        model = MMDiT(args, linears, tp_rank=tp_rank, attention=kernel,
                      sequence_parallel_group=tp_group if sequence_parallel else None)
    if str(device) != "meta":
        model.to_empty(device=device)
    mark_tensor_parallel_params(model)
    return model


def mark_tensor_parallel_params(model: MMDiT) -> None:
    """Set megatron's per-parameter TP attributes, which its DDP, optimizer and grad-norm code
    read (a sharded parameter counts on every rank, a replicated one on TP rank 0 only).
    Megatron sets them only when it initializes weights itself; ours come from init_weights."""
    from mmdit.model.sharding import partition_dims

    for name, dim in partition_dims(model).items():
        p = model.get_parameter(name)
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = dim is not None, dim or 0, 1
        p.allreduce = True  # data-parallel gradient all-reduce (megatron DDP reads this)
