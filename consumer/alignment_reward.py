"""GRPO's image-text alignment reward (`train.grpo.reward=alignment`).

Each rollout's final latents are decoded with encoders.dir's VAE, exactly as the sampler decodes
them (consumer/reward_base.py `decode_latents`, `to_image`), and each image is scored against its own
prompt by a CLIP or SigLIP model from a local directory (`train.grpo.alignment_model`) with the
`AlignmentScorer` `mmdit eval` and `mmdit annotate` use: the cosine similarity of the image and
text embeddings, in [-1, 1], the same scale as the `alignment` figure of `mmdit eval`.

An image the scorer cannot take (its batch raises) is scored alone; one that still fails gets
NaN, which GRPO drops from its group, and the other images keep their scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mmdit.config import ConfigError
from mmdit.consumer.reward_base import Submits, decode_latents, to_image

log = logging.getLogger("mmdit.grpo")


class AlignmentReward(Submits):
    """Cosine similarity of each decoded image and its prompt under a local CLIP/SigLIP model, [B] float32;
    `submit` scores on a background thread (reward_base.Submits), as the other in-process rewards do."""

    def __init__(self, encoders, model_dir: str, scorer=None):
        self.encoders = encoders
        if scorer is None:
            from mmdit.producer.annotate.alignment import AlignmentScorer

            if not (Path(model_dir) / "config.json").is_file():
                raise ConfigError(f"invalid config: train.grpo.alignment_model={model_dir!r} has no config.json "
                                  "(a local CLIP or SigLIP directory)")
            scorer = AlignmentScorer.load(model_dir, encoders.device)
        self.scorer = scorer

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        enc = self.encoders
        pixels = decode_latents(enc.vae, latents, enc.device, enc.dtype)  # [B, 3, H, W] in [-1, 1]
        images = [to_image(p) for p in pixels]
        captions = [p.prompt for p in prompts]
        try:
            scores = self.scorer.score(images, captions)
        except Exception as e:  # find the image that fails: the others keep their scores
            log.warning("alignment reward failed for a batch of %d images (%s); scoring them one by one", len(images), e)
            scores = [self._one(image, caption) for image, caption in zip(images, captions)]
        return torch.tensor(scores, dtype=torch.float32)

    def _one(self, image, caption: str) -> float:
        try:
            return float(self.scorer.score([image], [caption])[0])
        except Exception as e:
            log.warning("alignment reward failed for prompt %r: %s", caption, e)
            return float("nan")
