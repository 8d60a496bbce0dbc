"""`mmdit sample RUN_OR_CKPT prompt=... out=DIR`: generate images from a checkpoint (consumer/sample.py).

One image per prompt (00.png, 01.png, ...) and, for several, a grid; `image=SRC` makes each prompt
an edit instruction for SRC. Prints what it wrote, with the settings, as one JSON line.

`negative_prompt=` (the shell's `negative_prompt=""`) runs true CFG against the empty prompt, as
QwenImagePipeline does; unset, CFG runs against " ". `true_cfg_scale=1` turns CFG off.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mmdit.consumer.sample import SampleConfig, grid, load_sampler
from mmdit.launch.args import Action, Command, parse


@dataclass
class SampleArgs(SampleConfig):
    """`mmdit sample`'s keys: the sampling settings (SampleConfig) and what to sample."""

    prompt: list[str] = field(default_factory=list)
    """A prompt; give several (`prompt=a prompt=b`) for one image each and a grid."""
    out: str = "samples"
    """Directory the images are written to."""
    image: str = ""
    """A source image: each prompt is then an edit instruction for it."""
    encoders: str = ""
    """The VAE and Qwen2.5-VL (a Qwen-Image-layout directory); default: the run's encoders.dir."""
    weights: str = "raw"
    """raw: the trained weights | ema: their moving average (a run with train.ema_decay > 0)."""

    def __post_init__(self):
        super().__post_init__()
        if self.negative_prompt in ('""', "''"):  # written without a shell to remove the quotes
            self.negative_prompt = ""
        if not self.prompt:
            raise ValueError("give at least one prompt=...")
        if self.weights not in ("raw", "ema"):
            raise ValueError(f"weights must be raw or ema, got {self.weights!r}")

    def sampling(self) -> SampleConfig:
        return SampleConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SampleConfig)})


COMMAND = Command("sample", __doc__, actions=(Action(
    paths={"RUN_OR_CKPT": "a run directory (its newest checkpoint) or a checkpoint"}, keys=SampleArgs,
    overrides=None),))


def main(argv: list[str]) -> int:
    from PIL import Image
    from tqdm import tqdm

    args = parse(COMMAND, argv)
    keys: SampleArgs = args.keys
    cfg = keys.sampling()
    image = Image.open(keys.image) if keys.image else None
    sampler = load_sampler(args.paths[0], keys.encoders or None, keys.weights)
    out = Path(keys.out)
    out.mkdir(parents=True, exist_ok=True)
    images, written = [], []
    guided = 2 if cfg.guided else 1
    with tqdm(total=len(keys.prompt) * cfg.steps * guided, desc="sample", disable=not sys.stderr.isatty()) as bar:
        for i, prompt in enumerate(keys.prompt):
            img = sampler.generate(prompt, cfg, image, progress=bar)
            path = out / f"{i:02d}.png"
            img.save(path)
            images.append(img)
            written.append(str(path))
    if len(images) > 1:
        grid(images).save(out / "grid.png")
        written.append(str(out / "grid.png"))
    print(json.dumps({"images": written, "prompts": keys.prompt, "weights": keys.weights, **cfg.__dict__},
                     ensure_ascii=False))
    return 0
