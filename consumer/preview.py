"""Images during training (`eval.sample_every`): the fixed prompts, sampled from the model as it is.

Every N steps the TP ranks of DP rank 0 generate `eval.sample_prompts` together (each rank holds
its heads; the noise comes from the prompt's index, so every rank draws the same) and TP rank 0
writes run.dir/samples/step_N/: one PNG per prompt, grid.png and prompts.json. The same prompts
and seeds at every step make a series in which only the weights change. The encoders (the VAE and
Qwen2.5-VL of encoders.dir) load on first use and stay.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmdit.consumer.sample import SampleConfig, Sampler, grid
from mmdit.utils.atomic import atomic_path


def preview_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step_{step:08d}"


def write_previews(model, plan, encoders, evals, out: Path, write: bool = True) -> list[Path]:
    """Generate `eval.sample_prompts` with `model`, run as the trainer's `plan` says; PNGs under
    `out` when `write` (one writer per TP group). The model is left in training mode."""
    sampler = Sampler(model, plan, encoders)
    try:
        images = [sampler.generate(prompt, SampleConfig(evals.sample_size, evals.sample_size, evals.sample_steps,
                                                        evals.sample_cfg_scale, seed=i))
                  for i, prompt in enumerate(evals.sample_prompts)]
    finally:
        model.train()
    if not write:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i:02d}.png" for i in range(len(images))] + [out / "grid.png"]
    for path, image in zip(paths, [*images, grid(images)]):
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    with atomic_path(out / "prompts.json") as tmp:
        Path(tmp).write_text(json.dumps(list(evals.sample_prompts), ensure_ascii=False, indent=1))
    return paths
