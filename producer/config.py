"""Producer-side settings: what data to read, how to filter and bucket it, where to cache it."""

from dataclasses import dataclass, field


@dataclass
class FilterConfig:
    """Thresholds that select samples from their stored scores (see producer/scores.py).

    Scores are computed once into the manifest; changing a threshold never re-decodes an image.
    """

    min_side: int = 64
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    min_blur: float = 0.0
    """Minimum Laplacian variance (sharpness)."""
    min_brightness: float = 0.0
    max_brightness: float = 1.0
    min_contrast: float = 0.0
    min_entropy: float = 0.0
    min_caption_chars: int = 1
    max_caption_chars: int = 4000
    drop_duplicates: bool = True


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)
    """Webdataset shard URLs: paths, globs, brace patterns (anything webdataset takes)."""
    base_resolution: int = 256
    """Curriculum stage: bucket set with this base side (256, 640 or 1328)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    task_weights: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "edit": 1.0})
    """Relative weight of each task in the batch mixture."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per data source (shard stem); sources not named weigh 1."""
    encode_batch_size: int = 8


@dataclass
class CacheConfig:
    dir: str = "cache"
    """Latent cache and manifest directory (shared by all producers of a job)."""


@dataclass
class EncodersConfig:
    dir: str = ""
    """A directory laid out like the public Qwen-Image repository (vae/, text_encoder/, tokenizer/)."""
    device: str = "auto"
    dtype: str = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    max_text_tokens: int = 1024


@dataclass
class SynthConfig:
    num_samples: int = 64
    edit_fraction: float = 0.25
    samples_per_shard: int = 32
    seed: int = 0
