"""Generating images: Qwen-Image's flow-matching Euler sampler with true classifier-free guidance.

    mmdit sample CKPT_OR_RUN_DIR prompt="..." [prompt="..." ...] [image=SRC.png] [width=W height=H]
                 [seed=S steps=N true_cfg_scale=4 negative_prompt=TEXT] [encoders=DIR] out=DIR

A run directory means its newest checkpoint and its config's `encoders.dir`; a checkpoint (a
`step_N/` directory or an mmdit model checkpoint) needs `encoders=DIR`. Prompts are encoded with
the release's templates (producer/encoders.py), the image starts as noise drawn from `seed`, the
transformer integrates the flow on QwenImagePipeline's sigmas (model/flow.py), the VAE decodes.
With `image=SRC` it edits: the source, resized to the output size, is both the condition latents
(frame 1 of MSRoPE) and vision tokens of the edit prompt. Writes one PNG per prompt and, for
several prompts, a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from mmdit.model.mmdit import pack_latents, packed_shape, unpack_latents

DEFAULT_NEGATIVE_PROMPT = " "
"""What an unset negative prompt means (QwenImagePipeline's examples pass " ")."""


@dataclass
class SampleConfig:
    width: int = 256
    height: int = 256
    steps: int = 20
    true_cfg_scale: float = 4.0
    """Guidance scale of true CFG; > 1 runs it (two model calls per step), <= 1 does not."""
    negative_prompt: str | None = None
    """The negative prompt of true CFG: None (unset) is " ", the default of QwenImagePipeline's
    examples; "" is the empty prompt, run as QwenImagePipeline runs `negative_prompt=""`
    (CFG on, against the empty prompt's features), never a switch that turns CFG off."""
    seed: int = 0

    def __post_init__(self):
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive multiples of 16, got {self.width}x{self.height}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")

    @property
    def guided(self) -> bool:
        """Does sampling run true CFG (as QwenImagePipeline's `do_true_cfg` with a negative prompt)?"""
        return self.true_cfg_scale > 1.0

    @property
    def negative(self) -> str:
        """The negative prompt CFG runs with ("" stays ""; None is the default " ")."""
        return DEFAULT_NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt


class Sampler:
    """A model with its encoders: prompts in, PIL images out. `plan` (parallel/parallelize.py)
    says where and in which dtype the model runs: `load_sampler`'s own, or the trainer's for
    previews (its TP ranks sample together)."""

    def __init__(self, model, plan, encoders):
        self.model, self.plan, self.enc = model.eval(), plan, encoders

    def _velocity(self, x, sigma, txt, cond_tokens, shapes):
        device, dtype = self.plan.device, self.plan.compute_dtype
        tokens = x if cond_tokens is None else torch.cat([x, cond_tokens], dim=1)
        with torch.autocast(device.type, dtype=dtype, enabled=self.plan.autocast):
            out = self.model(tokens.to(device, dtype), txt.unsqueeze(0).to(device, dtype), None,
                             sigma.to(device) if torch.is_tensor(sigma) else sigma, shapes)
        return out[:, :x.shape[1]].float().to(x.device)

    @torch.no_grad()
    def generate(self, prompt: str, cfg: SampleConfig, image: Image.Image | None = None, progress=None) -> Image.Image:
        from mmdit.model.flow import euler_sample

        h, w = cfg.height // 8, cfg.width // 8
        shapes = [packed_shape(h, w)]
        cond_tokens = None
        if image is None:
            txt = self.enc.encode_prompts([prompt])[0]
            neg = self.enc.encode_prompts([cfg.negative])[0] if cfg.guided else None
        else:
            source = image.convert("RGB")
            pixels = self.enc.preprocess_image(source, (cfg.height, cfg.width))
            cond_tokens = pack_latents(self.enc.encode_images(pixels[None]))
            shapes.append(packed_shape(h, w))
            txt = self.enc.encode_edit_prompts([prompt], [source])[0]
            neg = self.enc.encode_edit_prompts([cfg.negative], [source])[0] if cfg.guided else None
        guided = neg is not None
        generator = torch.Generator().manual_seed(cfg.seed)
        noise = pack_latents(torch.randn(1, self.enc.latent_channels, h, w, generator=generator))

        def velocity(x, sigma):
            v = self._velocity(x, sigma, txt, cond_tokens, shapes)
            if guided:  # QwenImagePipeline's true CFG, with its norm rescale
                v_neg = self._velocity(x, sigma, neg, cond_tokens, shapes)
                comb = v_neg + cfg.true_cfg_scale * (v - v_neg)
                v = comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            if progress is not None:
                progress.update(1)
            return v

        latents = euler_sample(velocity, noise, cfg.steps, noise.shape[1])
        return self.decode(unpack_latents(latents, h, w))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Image.Image:
        """Normalized latents [1, 16, h, w] -> the VAE's image."""
        config = self.enc.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        z = (latents.float() * std + mean).to(self.enc.device, self.enc.dtype)[:, :, None]  # [1, 16, 1, h, w]
        pixels = self.enc.vae.decode(z).sample[0, :, 0].float().clamp(-1, 1)  # [3, H, W]
        return Image.fromarray(((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy(), "RGB")


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        sheet.paste(img, ((i % columns) * w, (i // columns) * h))
    return sheet


@dataclass(frozen=True)
class ModelSource:
    """Where a model to sample comes from, and the run it belongs to (when it belongs to one)."""

    model_dir: Path
    """An mmdit model checkpoint (its index and shards)."""
    encoders_dir: str | None
    run_dir: Path | None
    """The run directory of a run's checkpoint: where evaluations of it are written."""
    step: int | None
    """The training step of a run's checkpoint."""
    encoders: dict = field(default_factory=dict)
    """The run's `encoders` settings (edit_template, max_text_tokens, ...): a model is sampled
    with the conditioning it was trained on."""

    def encoders_config(self):
        from mmdit.config.produce import EncodersConfig

        known = {f.name for f in fields(EncodersConfig)}
        return EncodersConfig(**{**{k: v for k, v in self.encoders.items() if k in known}, "dir": str(self.encoders_dir)})


def locate_model(source: str | Path, encoders_dir: str | None = None) -> ModelSource:
    """A run directory means its newest complete checkpoint, a run's `checkpoints/step_N` that
    checkpoint, anything else an mmdit model checkpoint (or a directory holding one in `model/`).
    `encoders_dir` None: the run's config's `encoders.dir`."""
    from mmdit.consumer.checkpoint import CHECKPOINTS, resume_checkpoint, step_of
    from mmdit.model.checkpoint import is_checkpoint

    source = Path(source)
    run_dir = step = None
    if (source / CHECKPOINTS).is_dir() or (source / "config.yaml").is_file():
        ckpt = resume_checkpoint(source)
        if ckpt is None:
            raise FileNotFoundError(f"{source} has no checkpoint yet")
        model_dir, run_dir, step = ckpt / "model", source, step_of(ckpt)
    else:
        model_dir = source / "model" if is_checkpoint(source / "model") else source
        if source.parent.name == CHECKPOINTS and source.name.removeprefix("step_").isdigit():
            run_dir, step = source.parent.parent, step_of(source)
    if not is_checkpoint(model_dir):
        raise FileNotFoundError(f"{source}: neither a run directory nor an mmdit checkpoint")
    encoders = {}
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        encoders = yaml.safe_load((run_dir / "config.yaml").read_text()).get("encoders") or {}
    if encoders_dir is None:
        encoders_dir = encoders.get("dir")
    return ModelSource(model_dir, encoders_dir or None, run_dir, step, encoders)


def load_sampler(source: str | Path | ModelSource, encoders_dir: str | None = None, weights: str = "raw") -> Sampler:
    """The model of a run directory's newest checkpoint (or of a checkpoint), with its encoders;
    `weights="ema"`: the checkpoint's EMA weights in place of the trained ones (parallel/ema.py)."""
    from mmdit.config.parallel import ParallelConfig
    from mmdit.model.checkpoint import checkpoint_args
    from mmdit.parallel.parallelize import parallelize
    from mmdit.producer.encoders import Encoders

    found = source if isinstance(source, ModelSource) else locate_model(source, encoders_dir)
    if not found.encoders_dir:
        raise ValueError("no encoders: give encoders=DIR (a Qwen-Image-layout directory)")
    model_dir = found.model_dir
    built = parallelize(checkpoint_args(model_dir), ParallelConfig(), weights=model_dir)  # this process, TP=1
    if weights == "ema":
        from mmdit.parallel.ema import ema_dir_of, load_ema

        load_ema(built.model, ema_dir_of(model_dir))
    elif weights != "raw":
        raise ValueError(f"weights must be raw or ema, got {weights!r}")
    return Sampler(built.model, built.plan, Encoders.load(found.encoders_config()))
