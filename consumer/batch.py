"""A batch from the data service, as the model takes it."""

from dataclasses import dataclass

import torch

from mmdit.model.mmdit import pack_latents, packed_shape


@dataclass
class StepInputs:
    """A batch as the model takes it: packed tokens, text, and the RoPE image shapes."""

    x0: torch.Tensor  # [B, N, C*4] packed target latents, fp32 (targets are built in fp32)
    cond_tokens: torch.Tensor | None  # [B, Nc, C*4] packed condition latents (edit), compute dtype
    txt: torch.Tensor  # [B, L, D] prompt embeddings, compute dtype
    txt_mask: torch.Tensor | None  # [B, L] bool; None when nothing is padded (flash attention)
    image_shapes: list  # (frames, rows, cols) of the target, then of the condition image

    @classmethod
    def from_batch(cls, batch: dict, device, dtype) -> "StepInputs":
        latents, cond, mask = batch["latents"].to(device), batch.get("cond_latents"), batch["prompt_mask"]
        # Text padding past the longest prompt of this micro-batch is cut (exact: text RoPE positions
        # follow the token index, and padded keys are masked anyway); with nothing padded left, no
        # mask at all, so attention can take its fused (flash) kernels. Decided on the host.
        length = int(mask.sum(dim=1).max()) if mask.numel() else 0
        mask, embeds = mask[:, :length], batch["prompt_embeds"][:, :length]
        shapes = [packed_shape(*latents.shape[-2:])]
        if cond is not None:
            shapes.append(packed_shape(*cond.shape[-2:]))
        return cls(
            x0=pack_latents(latents).float(),
            cond_tokens=None if cond is None else pack_latents(cond.to(device)).to(dtype),
            txt=embeds.to(device, dtype),
            txt_mask=None if bool(mask.all()) else mask.to(device),
            image_shapes=shapes,
        )
