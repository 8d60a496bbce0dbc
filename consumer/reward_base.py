"""What every GRPO reward shares (consumer/rewards.py has the rewards themselves): the `Reward`
signature, `Submits` (the background `submit`), and the decode of final latents to images that the
rewards of decoded images use (consumer/rewards.py `OcrReward`, consumer/alignment_reward.py).
Its own module so that rewards in modules of their own import it without an import cycle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Reward = Callable[[torch.Tensor, Sequence], torch.Tensor]


class Submits:
    """`submit(latents, prompts) -> Future` of `self(latents, prompts)`, run on one background
    thread (started on the first submit, ended by `close`): requests are scored in order."""

    _executor: ThreadPoolExecutor | None = None

    def submit(self, latents: torch.Tensor, prompts: Sequence) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="reward")
        return self._executor.submit(self, latents, prompts)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def decode_latents(vae, latents: torch.Tensor, device, dtype) -> torch.Tensor:
    """Normalized latents [B, 16, h, w] -> pixels [B, 3, H, W] in [-1, 1], float32 on the CPU."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    z = (latents.float().cpu() * std + mean).to(device, dtype)[:, :, None]  # [B, 16, 1, h, w]
    return vae.decode(z).sample[:, :, 0].float().clamp(-1, 1).cpu()


def to_image(pixels: torch.Tensor):
    """[3, H, W] in [-1, 1] -> a PIL RGB image."""
    from PIL import Image

    return Image.fromarray(((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")
