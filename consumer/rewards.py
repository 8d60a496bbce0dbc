"""GRPO's reward slot (`train.grpo.reward`): final latents and their prompts in, one score each out.

A reward is a callable `reward(latents, prompts) -> [B] float32`, where `latents` are the
rollout's final normalized latents [B, 16, h, w] (float32, CPU) and `prompts` the B prompts
(consumer/text_eval/prompts.py `TextPrompt`: prompt, target_texts). A sample the reward cannot
score gets NaN: GRPO drops it from its group (consumer/grpo_objective.py).

- `ocr`: decode with the VAE of encoders.dir, read the image with RapidOCR (consumer/text_eval/
  ocr.py) and score the reading's word accuracy against the prompt's target_texts, as `mmdit
  eval` does (consumer/text_eval/scoring.py).
- `latent_target`: -mean((latents - target)^2), a cheap toy that tests learning without a VAE.
- `package.module:function`: a user's own, called as above; whatever it returns becomes B floats.

Rewards run in the trainer process of TP rank 0 of each group, which broadcasts them to its TP
group, and the step waits for them; a decoupled reward service (workers over RPC, scoring while
the next rollout runs) is still to come.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger("mmdit.grpo")

Reward = Callable[[torch.Tensor, Sequence], torch.Tensor]


class LatentTarget:
    """-mean((latents - target)^2) per image: highest when every latent element equals `target`."""

    def __init__(self, target: float):
        self.target = target

    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        return -(latents.float() - self.target).square().mean(dim=tuple(range(1, latents.dim())))


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


class OcrReward:
    """OCR word accuracy of the decoded image against the prompt's target_texts, in [0, 1]."""

    def __init__(self, encoders, threads: int = 0, engine=None):
        from mmdit.consumer.text_eval.ocr import OcrEngine

        self.encoders = encoders
        self.engine = engine or OcrEngine(threads)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        from mmdit.consumer.text_eval.scoring import score_reading

        enc = self.encoders
        pixels = decode_latents(enc.vae, latents, enc.device, enc.dtype)
        scores = []
        for image, prompt in zip(pixels, prompts):
            try:
                reading = self.engine.read(to_image(image))
                scores.append(score_reading(prompt.target_texts, reading.lines)["word_accuracy"])
            except Exception as e:  # one unreadable image costs its sample, not the step
                log.warning("ocr reward failed for prompt %r: %s", prompt.prompt, e)
                scores.append(float("nan"))
        return torch.tensor(scores, dtype=torch.float32)


class EntryPoint:
    """A user's reward `package.module:function`; an exception makes the whole batch NaN."""

    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        self.spec, self.fn = spec, getattr(importlib.import_module(module), name)

    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        try:
            out = torch.as_tensor(self.fn(latents, prompts), dtype=torch.float32).reshape(-1)
        except Exception as e:
            log.warning("reward %s failed: %s", self.spec, e)
            return torch.full((latents.shape[0],), float("nan"))
        if out.shape[0] != latents.shape[0]:
            raise ValueError(f"reward {self.spec} returned {out.shape[0]} scores for {latents.shape[0]} images")
        return out


def build_reward(grpo, encoders_loader: Callable[[], object]) -> Reward:
    """`train.grpo.reward` -> the callable; `encoders_loader()` gives the Encoders (only ocr loads them)."""
    if grpo.reward == "latent_target":
        return LatentTarget(grpo.latent_target)
    if grpo.reward == "ocr":
        return OcrReward(encoders_loader(), grpo.ocr_threads)
    return EntryPoint(grpo.reward)
