"""The offline pipeline's settings: the cache, the frozen encoders, annotation, synthetic data."""

import math
from dataclasses import dataclass, field

from mmdit.utils.dtypes import check_dtype

EDIT_TEMPLATES = ("edit_plus", "edit")
"""What encoders.edit_template may be (producer/prompts.py EDIT_CONDITIONINGS: one per diffusers edit pipeline)."""
FEATURE_DTYPES = ("bf16", "fp32")
"""What cache.feature_dtype may be: bf16 keeps fp32's range at half the bytes (fp16 does not)."""


@dataclass
class CacheConfig:
    dir: str = "cache"
    """Latent cache and manifest directory (shared by all producers of a job):
    <dir>/<fingerprint>/<H>x<W>/seg-*.safetensors, <dir>/manifest/part-*.parquet, <dir>/report.json."""
    segment_records: int = 64
    """A producer publishes a segment once it holds this many encoded records (per write)..."""
    segment_seconds: float = 5.0
    """...or once its oldest unpublished record is this old: fewer, larger files read faster
    and index faster, while a killed producer loses at most this much work."""
    feature_dtype: str = "bf16"
    """How producers store prompt features (`prompt_embeds`): bf16 (half the bytes to store, read
    and send; what the encoder computes on a GPU) or fp32. Readers take either, so a cache may
    hold both; latents stay fp32. Not part of the fingerprint: changing it re-encodes nothing."""

    def __post_init__(self):
        if self.segment_records < 1 or self.segment_seconds < 0:
            raise ValueError("cache.segment_records must be >= 1 and cache.segment_seconds >= 0")
        check_dtype("cache.feature_dtype", self.feature_dtype, FEATURE_DTYPES)


@dataclass
class EncodersConfig:
    """The frozen encoders (VAE + Qwen2.5-VL); every field that changes features is fingerprinted."""

    dir: str = ""
    """A directory laid out like the public Qwen-Image repository: vae/, text_encoder/, tokenizer/,
    and processor/ (Qwen2VLImageProcessor config; needed only for edit prompts)."""
    device: str = "auto"
    """auto: cuda if available, else cpu; or any torch device string."""
    dtype: str = "auto"
    """auto: bf16 on GPU, fp32 on CPU; or bf16 / fp16 / fp32."""
    max_text_tokens: int = 1024
    """Prompt text tokens kept per sample after the template prefix is dropped (an edit prompt's
    image tokens come on top: the edit pipelines never cut them)."""
    resample: str = "bicubic"
    """PIL filter for the VAE input resize (bicubic, lanczos, bilinear, nearest)."""
    edit_template: str = "edit_plus"
    """How edit prompts are conditioned, as one diffusers pipeline does it (features equal its
    `encode_prompt`): edit_plus (QwenImageEditPlusPipeline, Qwen-Image-Edit-2509 on: the source at
    about 384x384 pixels after "Picture 1: ") or edit (QwenImageEditPipeline, the first
    Qwen-Image-Edit: the source at about 1024x1024). Fingerprinted, and recorded with the cache: a
    cache of the other kind is refused. Sample and export with the pipeline of the same kind."""
    edit_vision_area: int = 0
    """Pixel area the edit source image is resized to before Qwen2.5-VL sees it (aspect kept,
    sides multiples of 32); 0: the edit template's own (384*384 for edit_plus, 1024*1024 for
    edit). Any other value matches neither pipeline."""

    def __post_init__(self):
        check_dtype("encoders.dtype", self.dtype)
        if self.resample not in ("bicubic", "lanczos", "bilinear", "nearest"):
            raise ValueError(f"encoders.resample must be bicubic, lanczos, bilinear or nearest, not {self.resample!r}")
        if self.max_text_tokens < 1:
            raise ValueError("encoders.max_text_tokens must be >= 1")
        if self.edit_vision_area and self.edit_vision_area < 56 * 56:
            raise ValueError("encoders.edit_vision_area must be 0 (the template's) or >= 3136 (56x56)")
        if self.edit_template not in EDIT_TEMPLATES:
            raise ValueError(f"encoders.edit_template must be one of {', '.join(EDIT_TEMPLATES)}, "
                             f"not {self.edit_template!r}")


@dataclass
class AnnotateConfig:
    """`mmdit annotate`: a VL model's JSON annotation and an alignment score per accepted sample
    (producer/annotate/run.py). Runs on encoders.device with encoders.dtype."""

    model: str = "auto"
    """The Qwen2.5-VL that annotates: a Qwen-Image-layout directory (text_encoder/, tokenizer/,
    processor/) or a plain Qwen2.5-VL-Instruct one; auto: encoders.dir; none: skip annotation."""
    alignment_model: str = "auto"
    """A local CLIP or SigLIP directory (AutoModel + AutoProcessor) that scores image-caption
    alignment; auto: <encoders.dir>/alignment if it exists, else skip; none or '': skip."""
    batch_size: int = 8
    """Samples per VL-model generate call."""
    max_new_tokens: int = 256
    """Longest answer generated; a JSON object cut off here counts as unparseable."""
    image_area: int = 448 * 448
    """Pixel area the VL model sees (aspect kept, sides multiples of 28): 448*448 is 256 vision tokens."""
    limit: int = 0
    """Annotate at most this many samples this run (0: all); a later run does the rest."""
    flush_seconds: float = 10.0
    """Publish manifest rows after a batch once this long has passed since the last publish (0:
    every batch): a killed run loses at most this much work, without a part file per batch."""

    def __post_init__(self):
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.limit < 0 or self.flush_seconds < 0:
            raise ValueError("annotate: batch_size and max_new_tokens must be >= 1, limit and flush_seconds >= 0")
        if self.image_area < 56 * 56:
            raise ValueError("annotate.image_area must be >= 3136 (56x56)")


@dataclass
class SynthConfig:
    """`mmdit synth`: rendered Chinese/English text images and edit triplets (producer/synth/shards.py)."""

    KINDS = ("pure", "compositional", "complex")  # not a field: the kind names `kinds` may weigh

    num_samples: int = 64
    """Samples to render in all."""
    kinds: dict[str, float] = field(default_factory=lambda: {"pure": 0.5, "compositional": 0.25, "complex": 0.25})
    """Relative weight of each kind: pure (text on a plain or gradient background), compositional
    (text in perspective on a surface in a scene), complex (slides, app/web screens, posters)."""
    edit_fraction: float = 0.25
    """Fraction of pure samples that are edit triplets (source, instruction, target); the other
    kinds are text-to-image only, so edits are edit_fraction x the pure share of all samples."""
    samples_per_shard: int = 32
    """Samples per webdataset shard (synth-%06d.tar)."""
    pairs: bool = False
    """Write preference pairs instead (Diffusion-DPO, train.objective=dpo): every sample is a pure
    rendering whose caption quotes its text, the "win" image rendering that text, the "lose" image
    the same scene with a corrupted string (about a third of its characters replaced)."""
    seed: int = 0
    """Sample i is a pure function of (seed, i)."""
    min_side: int = 256
    """Smallest image width or height drawn, in pixels."""
    max_side: int = 768
    """Image width and height are drawn independently from [min_side, max_side]."""
    zh_fraction: float = 0.5
    """Fraction of rendered texts in Chinese (the rest English)."""
    zh_caption_fraction: float = 0.3
    """Fraction of text-to-image captions written in Chinese."""
    font_dir: str = "/usr/share/fonts/truetype"
    """Where fonts-wqy-microhei and fonts-dejavu-core put their files (`make sysdeps`)."""
    backgrounds: str = ""
    """A directory of images (jpg, png, webp, bmp): compositional samples then put their text on a
    random one of them instead of a procedurally drawn scene. "" draws every scene."""

    def __post_init__(self):
        if self.num_samples < 0 or self.samples_per_shard < 1:
            raise ValueError("synth.num_samples must be >= 0 and synth.samples_per_shard >= 1")
        self.kinds = self._checked_kinds()
        if not 64 <= self.min_side <= self.max_side:
            raise ValueError(f"synth needs 64 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        for name in ("edit_fraction", "zh_fraction", "zh_caption_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"synth.{name} must be in [0, 1]")

    def _checked_kinds(self) -> dict[str, float]:
        kinds = {}
        for name, weight in dict(self.kinds).items():
            if name not in self.KINDS:
                raise ValueError(f"synth.kinds.{name}: unknown kind (one of {', '.join(self.KINDS)})")
            try:
                kinds[name] = float(weight)
            except (TypeError, ValueError):
                raise ValueError(f"synth.kinds.{name} must be a number, got {weight!r}") from None
            if not math.isfinite(kinds[name]) or kinds[name] < 0:
                raise ValueError(f"synth.kinds.{name} must be a finite weight >= 0, got {weight!r}")
        if not any(kinds.values()):
            raise ValueError(f"synth.kinds needs a weight > 0 for at least one of {', '.join(self.KINDS)}")
        return kinds
