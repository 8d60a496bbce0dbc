"""The VAE under fine-tuning: a frozen encoder half and a trainable decoder path.

`AutoencoderKLQwenImage` (the Wan-2.1 layout) turns an image into latents through `encoder` and
`quant_conv` (frozen: cached latents depend on nothing else, producer/encoders.py) and back through
`post_quant_conv` and `decoder` (trained). `latents_mean`/`latents_std` live in its config and are
never touched. Images are single video frames, [B, 3, 1, H, W] to the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmdit.producer.encoders import ENCODER_HALF

TRAINABLE = ("post_quant_conv.", "decoder.")
"""The decoder path's parameter names in the VAE's state dict (and in every file written here)."""
VIDEO_ONLY = ".time_conv."
"""The decoder's temporal upsampling convolutions: video frames after the first pass them, an
image never does, so they get no gradient and stay as they are (DDP needs every trained
parameter to receive one)."""


def vae_folder(path: str | Path) -> Path:
    """The folder holding the VAE's config.json: `path/vae` of a Qwen-Image layout, or `path` itself."""
    root = Path(path)
    for folder in (root / "vae", root):
        if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
            return folder
    raise FileNotFoundError(f"{root} holds no VAE: expected vae/config.json + vae/*.safetensors (a Qwen-Image "
                            "layout, e.g. `mmdit make-tiny-encoders DIR`) or config.json + *.safetensors")


def load_vae(folder: Path, device: torch.device | str = "cpu") -> nn.Module:
    """AutoencoderKLQwenImage from `folder`, fp32 (the trained weights' precision), encoder half frozen."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    vae.eval()  # no dropout in the decoder either: the fine-tune changes weights, not behaviour
    for name, param in vae.named_parameters():
        param.requires_grad_(name.startswith(TRAINABLE) and VIDEO_ONLY not in name)
        if not name.startswith(TRAINABLE + ENCODER_HALF):
            raise ValueError(f"unexpected VAE parameter {name!r}: neither encoder half nor decoder path")
    return vae


@torch.no_grad()
def encode(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> raw posterior mode [B, 16, H/8, W/8] (what the cache stores,
    before its normalization)."""
    return vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]


class DecoderPath(nn.Module):
    """`post_quant_conv` + `decoder` on one frame: `vae.decode(z)` before its clamp, with the
    blocks optionally checkpointed. A single frame never reads the decoder's temporal cache (the
    first frame's causal padding is zeros either way), so this is the same function without the
    cache bookkeeping (tested against `vae.decode`). Its parameters are the VAE's own modules."""

    def __init__(self, vae: nn.Module, recompute: bool = False):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder
        self.recompute = recompute

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = d.conv_in(self.post_quant_conv(z.unsqueeze(2)))  # [B, C, 1, h, w]
        for block in (d.mid_block, *d.up_blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.recompute and torch.is_grad_enabled() else block(x)
        x = d.conv_out(d.nonlinearity(d.norm_out(x)))  # [B, 3, 1, H, W]
        return x[:, :, 0]


def trainable_state(vae: nn.Module) -> dict[str, torch.Tensor]:
    """The decoder path's weights under the VAE's own names."""
    return {k: v for k, v in vae.state_dict().items() if k.startswith(TRAINABLE)}
