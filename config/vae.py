"""`mmdit vae-train`: fine-tuning the VAE's decoder on text-rich images (consumer/vae/).

The encoder (and with it every cached latent) stays frozen; only the decoder path
(`post_quant_conv` + `decoder`) trains. The run shares `run.dir`, `launch.*` and `seed` with the
other trainers; everything of its own is here.
"""

from dataclasses import dataclass, field

from mmdit.config.train import OptimizerConfig
from mmdit.utils.dtypes import check_dtype

RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclass
class VaeConfig:
    model: str = ""
    """The VAE to fine-tune: a Qwen-Image-layout directory (its vae/ is used) or a diffusers
    AutoencoderKLQwenImage directory; "": encoders.dir."""
    text_shards: list[str] = field(default_factory=list)
    """Webdataset shards of text-rich images (documents, slides, posters, `mmdit synth` output)."""
    general_shards: list[str] = field(default_factory=list)
    """Webdataset shards of general images, mixed in so the decoder keeps what it does well."""
    text_fraction: float = 0.8
    """Share of every global batch drawn from text_shards (the rest from general_shards): an exact
    count per batch, round(text_fraction x batch), not a coin flip per sample."""
    crop_size: int = 256
    """Side of the square random crops trained on (a multiple of 16); smaller images are scaled up
    to cover it first."""
    steps: int = 1000
    """Optimizer steps to run (in total, counting resumed ones)."""
    micro_batch_size: int = 4
    """Crops per data-parallel rank per forward/backward."""
    global_batch_size: int = 0
    """Crops per optimizer step over all DP ranks; a multiple of micro_batch_size x DP, the rest is
    gradient accumulation. 0: micro_batch_size x DP."""
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5, warmup_steps=100,
                                                                                 lr_schedule="constant"))
    """AdamW and its learning-rate schedule for the decoder (decay_steps 0: vae.steps)."""
    reconstruction: str = "l1"
    """Pixel reconstruction loss: l1 | l2 (mean over pixels, images in [-1, 1])."""
    perceptual_dir: str = ""
    """Local LPIPS weights (consumer/vae/perceptual.py): config.json, backbone and lin weights
    (.safetensors or .pth). Needed while a perceptual weight is > 0."""
    perceptual_weight_start: float = 0.1
    """Weight of the perceptual loss against the reconstruction loss (weight 1) at step 0..."""
    perceptual_weight: float = 1.0
    """...rising (or falling) linearly to this over perceptual_ramp_steps, then held."""
    perceptual_ramp_steps: int = 1000
    """Steps over which the perceptual weight moves from its start to its final value (0: final at once)."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 where the GPU supports it, else fp32) | bf16 | fp32. Weights and
    optimizer state stay fp32."""
    recompute: bool = False
    """Activation checkpointing of each decoder block (mid block, every up block): less memory
    for about one more decoder forward per step."""
    eval_fraction: float = 0.05
    """Text-rich samples held out for evaluation: those whose key hashes below this (the rule the
    MMDiT's held-out split uses), never trained on."""
    eval_max_samples: int = 16
    """At most this many held-out samples per evaluation."""
    eval_size: int = 256
    """Side of the centre crop each held-out image is evaluated at (a multiple of 16)."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before the first step and after the last)."""
    eval_ocr: bool = True
    """Read originals and reconstructions with the OCR engine (consumer/text_eval/ocr.py) and
    report word accuracy; off: PSNR and SSIM only."""
    eval_pairs: int = 4
    """Side-by-side crops (original | before | after) written per evaluation."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep: int = 3
    """Keep the newest N checkpoints (0: all)."""
    resume: bool = True
    """Resume from the newest checkpoint in run.dir when one exists."""
    export: bool = True
    """After the last step, write run.dir/export/: the base directory's layout with the new vae/
    (the other components linked), ready for encoders.dir, `mmdit sample` and QwenImagePipeline."""
    log_every: int = 1
    """Print a log line every N steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write the per-step scalars to run.dir/tensorboard/ as well."""

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"vae.reconstruction must be one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction!r}")
        check_dtype("vae.dtype", self.dtype, ("auto", "bf16", "fp32"))
        if not 0.0 <= self.text_fraction <= 1.0:
            raise ValueError(f"vae.text_fraction must be in [0, 1], got {self.text_fraction}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"vae.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("crop_size", "eval_size"):
            side = getattr(self, name)
            if side <= 0 or side % 16:
                raise ValueError(f"vae.{name} must be a positive multiple of 16, got {side}")
        if self.steps < 0 or self.micro_batch_size < 1 or self.global_batch_size < 0:
            raise ValueError("vae.steps and vae.global_batch_size must be >= 0, vae.micro_batch_size >= 1")
        for name in ("perceptual_weight_start", "perceptual_weight", "perceptual_ramp_steps", "eval_max_samples",
                     "eval_every", "eval_pairs", "save_every", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"vae.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError("vae.log_every must be >= 1")

    @property
    def uses_perceptual(self) -> bool:
        return self.perceptual_weight_start > 0 or self.perceptual_weight > 0


def check_vae_job(vae: VaeConfig, encoders_dir: str, dp: int) -> int:
    """What needs more than the section: where the model comes from, the data, the batch split
    over `dp` ranks. Returns gradient-accumulation steps; ValueError naming the keys."""
    if not (vae.model or encoders_dir):
        raise ValueError("vae.model (or encoders.dir) must name the VAE to fine-tune")
    if not vae.text_shards:
        raise ValueError("vae.text_shards must list the text-rich shards to train on")
    if vae.text_fraction < 1.0 and not vae.general_shards:
        raise ValueError(f"vae.text_fraction={vae.text_fraction} leaves room for general images but "
                         "vae.general_shards is empty (set vae.text_fraction=1 or give vae.general_shards)")
    if vae.uses_perceptual and not vae.perceptual_dir:
        raise ValueError("vae.perceptual_dir must name the LPIPS weights while a perceptual weight is > 0 "
                         "(or set vae.perceptual_weight_start=0 vae.perceptual_weight=0)")
    per_round = vae.micro_batch_size * dp
    global_batch = vae.global_batch_size or per_round
    if global_batch % per_round:
        raise ValueError(f"vae.global_batch_size={global_batch} must be a multiple of vae.micro_batch_size x DP = "
                         f"{vae.micro_batch_size} x {dp}")
    return global_batch // per_round
