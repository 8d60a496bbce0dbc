"""`mmdit sample RUN_OR_CKPT prompt=... out=DIR`: generate images from a checkpoint (consumer/sample.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from mmdit.consumer.sample import SampleConfig, grid, load_sampler


def _parse(argv: list[str]) -> tuple[str, dict]:
    if not argv or "=" in argv[0]:
        raise ValueError("usage: mmdit sample CKPT_OR_RUN_DIR prompt=... [image=SRC width= height= seed= steps= "
                         "true_cfg_scale= negative_prompt= encoders=DIR] out=DIR")
    args: dict = {"prompt": []}
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {arg!r}")
        if key == "prompt":
            args["prompt"].append(value)
        else:
            args[key] = value
    if not args["prompt"]:
        raise ValueError("give at least one prompt=...")
    return argv[0], args


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    from mmdit.config import ConfigError

    try:
        source, args = _parse(argv)
        cfg = SampleConfig(**{k: type(getattr(SampleConfig, k))(args.pop(k)) for k in list(args)
                              if k in SampleConfig.__dataclass_fields__})
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    out = Path(args.pop("out", "samples"))
    image = Image.open(args.pop("image")) if "image" in args else None
    encoders = args.pop("encoders", None)
    prompts = args.pop("prompt")
    if args:
        raise ConfigError(f"unknown arguments: {sorted(args)}")
    sampler = load_sampler(source, encoders)
    out.mkdir(parents=True, exist_ok=True)
    images, written = [], []
    guided = 2 if cfg.true_cfg_scale > 1 and cfg.negative_prompt else 1
    with tqdm(total=len(prompts) * cfg.steps * guided, desc="sample", disable=not sys.stderr.isatty()) as bar:
        for i, prompt in enumerate(prompts):
            img = sampler.generate(prompt, cfg, image, progress=bar)
            path = out / f"{i:02d}.png"
            img.save(path)
            images.append(img)
            written.append(str(path))
    if len(images) > 1:
        grid(images).save(out / "grid.png")
        written.append(str(out / "grid.png"))
    print(json.dumps({"images": written, "prompts": prompts, **cfg.__dict__}, ensure_ascii=False))
    return 0
