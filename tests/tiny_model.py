"""A tiny MMDiT whose prediction depends on its inputs, in this process (no training run needed).

`init_weights` starts the modulation and the output head at zero (DiT), so a fresh model predicts
zero whatever the prompt: sampling tests could not tell one prompt, or one guidance, from
another. Every parameter here gets a small seeded perturbation on top, as a few optimizer
steps would give it.
"""

from __future__ import annotations

from pathlib import Path

import torch


def perturbed_tiny_model(seed: int = 0, scale: float = 0.05):
    """The conf's tiny model on one rank (parallelize), perturbed: a `Parallelized`."""
    from mmdit.config.loader import load_config
    from mmdit.config.parallel import ParallelConfig
    from mmdit.parallel.parallelize import parallelize

    built = parallelize(load_config([]).model, ParallelConfig(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in built.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * scale)
    return built


def save_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """`perturbed_tiny_model` written as an mmdit model checkpoint (what `mmdit sample` loads)."""
    from mmdit.model.checkpoint import save_model

    save_model(perturbed_tiny_model(seed).model, path)
    return path
