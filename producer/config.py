"""Producer-side settings: what data to read, how to filter and bucket it, where to cache it."""

from dataclasses import dataclass, field
from typing import Any

from mmdit.utils.dtypes import check_dtype


@dataclass
class FilterConfig:
    """Thresholds that select samples from their stored scores (see producer/scores.py).

    Scores are computed once into the manifest; changing a threshold never re-decodes an image.
    """

    min_side: int = 64
    """Minimum of the original width and height, in pixels."""
    min_aspect: float = 0.25
    """Aspect range W/H kept (outside it, a centre crop to any bucket would lose too much)."""
    max_aspect: float = 4.0
    min_blur: float = 0.0
    """Minimum Laplacian variance (sharpness) of the 256-pixel thumbnail's grey levels (0..255)."""
    min_brightness: float = 0.0
    """Mean grey level range kept, in 0..1."""
    max_brightness: float = 1.0
    max_saturation: float = 1.0
    """Maximum mean HSV saturation, in 0..1 (over-saturated, garish images)."""
    min_contrast: float = 0.0
    """Minimum grey-level standard deviation, in 0..1."""
    min_entropy: float = 0.0
    """Minimum grey-histogram entropy in bits (0..8); flat images score 0."""
    min_caption_chars: int = 1
    max_caption_chars: int = 4000
    drop_duplicates: bool = True
    """Keep only the first sample of each perceptual hash (or of each near-duplicate cluster)."""
    duplicate_distance: int = 0
    """Perceptual hashes within this many bits (of 64) are duplicates: 0 exact copies only; 4
    catches re-encodes, resizes and small crops of one picture (producer/scores.py phash)."""
    min_alignment: float = -1.0
    """Minimum image-caption similarity from `mmdit annotate` (cosine of the alignment model's
    embeddings, -1..1); -1: off. Above -1, samples not scored yet are not selected."""
    drop_watermark: bool = False
    """Drop samples the annotation model flags as watermarked (unannotated samples pass)."""
    drop_qr_code: bool = False
    drop_mosaic: bool = False
    max_text_chars: int = -1
    """The text stage: longest rendered text kept, in characters (0: images without text only; a
    few dozen: short text; -1: any). From the samples' metadata (synthetic renderings record it)."""

    def __post_init__(self):
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(f"filters: need 0 < min_aspect <= max_aspect, got {self.min_aspect}, {self.max_aspect}")
        if not 0.0 <= self.min_brightness <= self.max_brightness <= 1.0:
            raise ValueError(f"filters: need 0 <= min_brightness <= max_brightness <= 1, got {self.min_brightness}, {self.max_brightness}")
        if not 0 <= self.duplicate_distance <= 16:
            raise ValueError(f"filters: duplicate_distance must be in 0..16 bits, got {self.duplicate_distance}")
        if not -1.0 <= self.min_alignment <= 1.0:
            raise ValueError(f"filters: min_alignment must be in [-1, 1], got {self.min_alignment}")
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"filters: min_caption_chars {self.min_caption_chars} > max_caption_chars {self.max_caption_chars}")


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)
    """Webdataset shard URLs: paths, globs, brace patterns (anything webdataset takes)."""
    base_resolution: int = 256
    """Curriculum stage: bucket set with this base side (256, 640 or 1328)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    task_weights: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "edit": 1.0, "reconstruction": 1.0})
    """Relative weight of each task in the batch mixture."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per data source (shard stem); sources not named weigh 1."""
    category_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per category (producer/categories.py: nature, design, people, synthetic,
    text_rendering, and unknown for samples without one); categories not named weigh 1."""
    stage_weights: dict[str, float] = field(default_factory=dict)
    """Multi-scale training: base resolution -> weight ({640: 1, 1328: 1} draws both stages'
    samples, each cached by its own `mmdit produce`); empty: base_resolution's stage only."""
    source_categories: dict[str, str] = field(default_factory=dict)
    """Category of every sample of a source (shard stem) whose metadata names none (e.g.
    {laion_people: people}); an annotation's category replaces it."""
    bucket_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per resolution bucket ("HxW"); buckets not named weigh 1."""
    reconstruction: bool = False
    """Also write a reconstruction record for every accepted image (task "reconstruction", key
    `<key>#reconstruction`): the image is both the Qwen2.5-VL condition and the target, the task
    Qwen-Image trains to align the MLLM's and the MMDiT's latents. Weigh it with
    task_weights.reconstruction."""
    curriculum: list[Any] = field(default_factory=list)
    """Scheduled data-config changes: [{step: 200, base_resolution: 640}, {step: 600,
    base_resolution: 1328, "filters.min_side": 512}, ...]. Each applies from the given training
    step through the same versioned history as `mmdit ctl set` (so resume is exact across it)."""
    eval_fraction: float = 0.0
    """Share of samples held out for evaluation (by a hash of the key): never planned for training,
    scored every `train.eval_every` steps."""
    encode_batch_size: int = 8
    """Samples per VAE / Qwen2.5-VL forward (one bucket per batch)."""
    decode_workers: int = 4
    """Threads that decode, score and resize ahead of the encoder."""
    max_image_pixels: int = 100_000_000
    """Images whose header claims more pixels are rejected before decoding (decompression bombs)."""

    def __post_init__(self):
        if self.base_resolution <= 0 or self.base_resolution % 16:
            raise ValueError(f"data.base_resolution {self.base_resolution} must be a positive multiple of 16")
        for entry in self.curriculum:
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int) or entry["step"] < 1 \
                    or len(entry) < 2:
                raise ValueError(f"data.curriculum entries are {{step: N >= 1, KEY: VALUE, ...}}, got {entry!r}")
        from mmdit.producer.categories import check_source_categories, check_weights

        self.source_categories = check_source_categories(self.source_categories)
        self.category_weights = check_weights(self.category_weights, "data.category_weights")
        for base, weight in self.stage_weights.items():
            if not str(base).isdigit() or int(base) % 16 or not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"data.stage_weights maps base resolutions (multiples of 16) to weights >= 0, "
                                 f"got {base}: {weight}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.encode_batch_size < 1 or self.decode_workers < 1:
            raise ValueError("data.encode_batch_size and data.decode_workers must be >= 1")


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

    def __post_init__(self):
        if self.segment_records < 1 or self.segment_seconds < 0:
            raise ValueError("cache.segment_records must be >= 1 and cache.segment_seconds >= 0")


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
    """Prompt features kept per sample after the template prefix is dropped."""
    resample: str = "bicubic"
    """PIL filter for the VAE input resize (bicubic, lanczos, bilinear, nearest)."""
    edit_vision_area: int = 384 * 384
    """Pixel area the edit source image is resized to before Qwen2.5-VL sees it (aspect kept,
    sides multiples of 32). 384*384 (about 190 vision tokens) as in QwenImageEditPlusPipeline; the
    first Qwen-Image-Edit used 1024*1024 (about 1340 tokens, over max_text_tokens)."""

    def __post_init__(self):
        check_dtype("encoders.dtype", self.dtype)
        if self.resample not in ("bicubic", "lanczos", "bilinear", "nearest"):
            raise ValueError(f"encoders.resample must be bicubic, lanczos, bilinear or nearest, not {self.resample!r}")
        if self.max_text_tokens < 1:
            raise ValueError("encoders.max_text_tokens must be >= 1")
        if self.edit_vision_area < 56 * 56:
            raise ValueError("encoders.edit_vision_area must be >= 3136 (56x56)")


@dataclass
class AnnotateConfig:
    """`mmdit annotate`: a VL model's JSON annotation and an alignment score per accepted sample
    (producer/annotate.py). Runs on encoders.device with encoders.dtype."""

    model: str = "auto"
    """The Qwen2.5-VL that annotates: a Qwen-Image-layout directory (text_encoder/, tokenizer/,
    processor/) or a plain Qwen2.5-VL-Instruct one; auto: encoders.dir; none: skip annotation."""
    alignment_model: str = "auto"
    """A local CLIP or SigLIP directory (AutoModel + AutoProcessor) that scores image-caption
    alignment; auto: <encoders.dir>/alignment if it exists, else skip; none or '': skip."""
    batch_size: int = 8
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
    """`mmdit synth`: rendered Chinese/English text images and edit triplets (producer/synth.py)."""

    KINDS = ("pure", "compositional", "complex")  # not a field: the kind names `kinds` may weigh

    num_samples: int = 64
    kinds: dict[str, float] = field(default_factory=lambda: {"pure": 0.5, "compositional": 0.25, "complex": 0.25})
    """Relative weight of each kind: pure (text on a plain or gradient background), compositional
    (text in perspective on a surface in a scene), complex (slides, app/web screens, posters)."""
    edit_fraction: float = 0.25
    """Fraction of pure samples that are edit triplets (source, instruction, target); the other
    kinds are text-to-image only, so edits are edit_fraction x the pure share of all samples."""
    samples_per_shard: int = 32
    seed: int = 0
    """Sample i is a pure function of (seed, i)."""
    min_side: int = 256
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
        import math

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
