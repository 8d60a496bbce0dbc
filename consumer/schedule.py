"""The learning-rate schedule: linear warmup to `optimizer.lr`, then cosine, linear or constant
decay to `optimizer.min_lr` over the rest of `optimizer.decay_steps` (default: `train.steps`).

A pure function of the step, so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based: the step about to be taken)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, decay_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
