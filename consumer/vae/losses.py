"""What the decoder fine-tune minimizes: pixel reconstruction plus a perceptual loss whose weight
follows a schedule, and no adversarial term (the report dropped it: it stopped helping).

    loss_i = rec(x_i, x^_i) + w(step) * lpips(x_i, x^_i)        per crop; a step averages its crops

rec is L1 or L2 over the pixels in [-1, 1]; w moves linearly from vae.perceptual_weight_start to
vae.perceptual_weight over vae.perceptual_ramp_steps, then holds: a pure function of the step, so
a resumed run continues on the same schedule.

An OCR-feature loss is not here: the OCR engine of consumer/text_eval (RapidOCR) runs its PP-OCR
models in onnxruntime, which has no gradients; such a loss needs the recognizer in torch first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmdit.config.vae import VaeConfig


def perceptual_weight_at(step: int, start: float, end: float, ramp_steps: int) -> float:
    """The perceptual loss's weight at optimizer step `step` (0-based)."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return end
    return start + (end - start) * step / ramp_steps


def reconstruction(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean absolute (l1) or squared (l2) pixel error: [B]."""
    diff = output.float() - target.float()
    per_pixel = diff.abs() if kind == "l1" else diff.square()
    return per_pixel.flatten(1).mean(dim=1)


@dataclass
class DecoderLoss:
    cfg: VaeConfig
    lpips: torch.nn.Module | None
    """None: no perceptual term (both of its weights are 0)."""

    def __call__(self, output: torch.Tensor, target: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """(per-sample loss [B], per-sample terms {"reconstruction": [B], "perceptual": [B]}, detached)."""
        rec = reconstruction(output, target, self.cfg.reconstruction)
        terms = {"reconstruction": rec.detach()}
        if self.lpips is None:
            return rec, terms
        weight = perceptual_weight_at(step, self.cfg.perceptual_weight_start, self.cfg.perceptual_weight,
                                      self.cfg.perceptual_ramp_steps)
        perceptual = self.lpips(output.float(), target.float())
        terms["perceptual"] = perceptual.detach()
        return rec + weight * perceptual, terms
