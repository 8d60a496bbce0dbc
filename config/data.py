"""The data config: what to read, which samples the thresholds select and how the mixture weighs them.

`Mixture` (the weight tables) is shared by the job's `DataConfig` and by every version of a running
job's data config (dataservice/plan.py `DataVersion`), so a table is declared and checked once.
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("nature", "design", "people", "synthetic", "text_rendering")
"""The Qwen-Image report's top-level taxonomy: Nature (scenes, animals, objects, food), Design
(posters, UI, slides, art), People (portraits, activities), Synthetic (generated data, e.g. `mmdit
synth`), Text rendering (images whose subject is their text: documents, signs, screenshots)."""
UNKNOWN = "unknown"
"""How weights name the samples without a category."""
CAPTION_SOURCES = {"original": 1.0, "annotation": 0.0}
"""The captions a text-to-image sample can be trained with, and the weight of each that a
`caption_sources` table does not name: the sample's own caption, and the caption `mmdit annotate`
wrote for it."""


class CategoryError(ValueError):
    pass


def normalize_category(name: object) -> str:
    """A category name as written by people or models ("Text rendering", "TEXT-RENDERING") ->
    its canonical form ("text_rendering"); CategoryError if it is not one of CATEGORIES."""
    if not isinstance(name, str):
        raise CategoryError(f"a category is a string, got {name!r}")
    canonical = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if canonical not in CATEGORIES:
        raise CategoryError(f"unknown category {name!r} (one of {', '.join(CATEGORIES)})")
    return canonical


def check_category_weights(table: dict, where: str = "category_weights") -> dict[str, float]:
    """Category weights with canonical names (UNKNOWN allowed); CategoryError naming the bad one."""
    out = {}
    for name, weight in table.items():
        try:
            out[UNKNOWN if str(name).strip().lower() == UNKNOWN else normalize_category(name)] = weight
        except CategoryError as e:
            raise CategoryError(f"{where}.{name}: {e} or {UNKNOWN!r}") from None
    return out


def check_source_categories(table: dict) -> dict[str, str]:
    """`data.source_categories` normalized; CategoryError naming the bad entry."""
    out = {}
    for source, name in table.items():
        try:
            out[str(source)] = normalize_category(name)
        except CategoryError as e:
            raise CategoryError(f"data.source_categories.{source}: {e}") from None
    return out


@dataclass(kw_only=True)
class Mixture:
    """Relative weights of the samples a plan draws: task x source x category x bucket (x stage),
    and of the caption each text-to-image sample is trained with (`caption_sources`).

    A name a table does not list weighs 1 (a caption source: its CAPTION_SOURCES default); weight
    0 leaves its samples out.
    """

    TABLES = ("task_weights", "source_weights", "category_weights", "bucket_weights", "stage_weights",
              "caption_sources")

    task_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight of each task (t2i, edit, reconstruction)."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per data source (shard stem)."""
    category_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per category (nature, design, people, synthetic, text_rendering, and
    unknown for samples without one)."""
    bucket_weights: dict[str, float] = field(default_factory=dict)
    """Relative weight per resolution bucket ("HxW")."""
    stage_weights: dict[str, float] = field(default_factory=dict)
    """Multi-scale training: base resolution -> weight ({640: 1, 1328: 1} draws both stages'
    samples, each cached by its own `mmdit produce`); empty: the configured stage only."""
    caption_sources: dict[str, float] = field(default_factory=dict)
    """Which caption a text-to-image sample is trained with, by relative weight: original (its
    own) and annotation (`mmdit annotate`'s caption, encoded by `mmdit produce` or on demand). The
    plan picks one per sample and epoch from (seed, epoch, key); a sample without a usable
    annotation (not annotated, or its answer failed to parse) keeps its original, counted. Names
    not listed weigh original 1, annotation 0. Edit and reconstruction samples keep their own."""

    def caption_weights(self) -> dict[str, float]:
        """Every caption source's weight (CAPTION_SOURCES' defaults for those not listed)."""
        return {name: float(self.caption_sources.get(name, default)) for name, default in CAPTION_SOURCES.items()}

    def checked_mixture(self, where: str = "data") -> None:
        """Canonical category names, finite weights >= 0, stages named by their base resolution;
        ValueError naming the first bad entry (`<where>.<table>.<name>`)."""
        self.category_weights = check_category_weights(self.category_weights, f"{where}.category_weights")
        for table in self.TABLES:
            for name, weight in getattr(self, table).items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                        or weight < 0:
                    raise ValueError(f"{where}.{table}.{name} must be a finite weight >= 0, got {weight!r}")
        for base in self.stage_weights:
            if not str(base).isdigit() or int(base) % 16:
                raise ValueError(f"{where}.stage_weights maps base resolutions (multiples of 16) to weights, "
                                 f"got {base!r}")
        for name in self.caption_sources:
            if name not in CAPTION_SOURCES:
                raise ValueError(f"{where}.caption_sources.{name}: unknown caption source (one of "
                                 f"{', '.join(CAPTION_SOURCES)})")
        if not any(self.caption_weights().values()):
            raise ValueError(f"{where}.caption_sources: every caption weight is 0")

    def tables(self) -> dict[str, dict[str, float]]:
        """Every table, copied (names as strings, weights as floats)."""
        return {t: {str(k): float(v) for k, v in getattr(self, t).items()} for t in self.TABLES}


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
    """Upper end of the aspect range W/H kept."""
    min_blur: float = 0.0
    """Minimum Laplacian variance (sharpness) of the 256-pixel thumbnail's grey levels (0..255)."""
    min_brightness: float = 0.0
    """Mean grey level range kept, in 0..1."""
    max_brightness: float = 1.0
    """Upper end of the mean grey level kept, in 0..1."""
    max_saturation: float = 1.0
    """Maximum mean HSV saturation, in 0..1 (over-saturated, garish images)."""
    min_contrast: float = 0.0
    """Minimum grey-level standard deviation, in 0..1."""
    min_entropy: float = 0.0
    """Minimum grey-histogram entropy in bits (0..8); flat images score 0."""
    min_caption_chars: int = 1
    """Shortest caption kept, in characters."""
    max_caption_chars: int = 4000
    """Longest caption kept, in characters."""
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
    """Drop samples the annotation model flags as holding a QR code (unannotated samples pass)."""
    drop_mosaic: bool = False
    """Drop samples the annotation model flags as mosaicked or pixelated (unannotated samples pass)."""
    max_text_chars: int = -1
    """The text stage: longest rendered text kept, in characters (0: images without text only; a
    few dozen: short text; -1: any). From the samples' metadata (synthetic renderings record it)."""
    curated_list: str = ""
    """A curated set (SFT: conf/data/sft.yaml): a file of sample keys, one per line (lines starting
    with `#` are comments); only samples on it are selected. "" : no list. The plan reads the file whenever it
    builds a selection, so treat a list as immutable: to change the set mid-run, write a new file
    and hot-swap its path (`mmdit ctl set RUN filters.curated_list=NEW`), so resume replays the
    same plan. Producers ignore it (they cache everything)."""

    def __post_init__(self):
        if not 0 < self.min_aspect <= self.max_aspect:
            raise ValueError(f"filters: need 0 < min_aspect <= max_aspect, got {self.min_aspect}, {self.max_aspect}")
        if not 0.0 <= self.min_brightness <= self.max_brightness <= 1.0:
            raise ValueError(f"filters: need 0 <= min_brightness <= max_brightness <= 1, got {self.min_brightness}, {self.max_brightness}")
        if not 0 <= self.duplicate_distance <= 16:
            raise ValueError(f"filters: duplicate_distance must be in 0..16 bits, got {self.duplicate_distance}")
        if not -1.0 <= self.min_alignment <= 1.0:
            raise ValueError(f"filters: min_alignment must be in [-1, 1], got {self.min_alignment}")
        if self.curated_list and not os.path.isfile(self.curated_list):
            raise ValueError(f"filters: curated_list {self.curated_list!r} is not a file")
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"filters: min_caption_chars {self.min_caption_chars} > max_caption_chars {self.max_caption_chars}")


@dataclass(kw_only=True)
class DataConfig(Mixture):
    """The job's data: shards, the curriculum stage, thresholds and the mixture (`Mixture`'s tables)."""

    shards: list[str] = field(default_factory=list)
    """Webdataset shard URLs: paths, globs, brace patterns (anything webdataset takes)."""
    base_resolution: int = 256
    """Curriculum stage: bucket set with this base side (256, 640 or 1328)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    task_weights: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "edit": 1.0, "reconstruction": 1.0,
                                                                    "pair": 0.0})
    """Relative weight of each task in the batch mixture. Preference pairs (pair, for
    train.objective=dpo: conf/data/dpo.yaml) weigh 0 unless a config asks for them."""
    caption_sources: dict[str, float] = field(default_factory=lambda: dict(CAPTION_SOURCES))
    """Which caption a text-to-image sample is trained with, by relative weight: original (its
    own) and annotation (`mmdit annotate`'s caption). `mmdit produce` encodes the annotation
    captions when annotation weighs > 0 (producers with encoders encode the rest on demand); the
    plan picks one per sample and epoch from (seed, epoch, key), so resume and replay are exact; a
    sample whose annotation failed to parse keeps its original (counted). Hot-swappable:
    `mmdit ctl set RUN caption_sources.annotation=1`."""
    source_categories: dict[str, str] = field(default_factory=dict)
    """Category of every sample of a source (shard stem) whose metadata names none (e.g.
    {laion_people: people}); an annotation's category replaces it."""
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
    scored every `eval.every` steps."""
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
        self.checked_mixture()
        self.source_categories = check_source_categories(self.source_categories)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.encode_batch_size < 1 or self.decode_workers < 1:
            raise ValueError("data.encode_batch_size and data.decode_workers must be >= 1")


def preset_changes(data_cfg: DataConfig) -> dict:
    """The changes that make a running job's data config `data_cfg` (a composed DataConfig, e.g.
    conf/data/stage5.yaml): every weight table, every threshold and the stage, as a whole."""
    return {**data_cfg.tables(), "filters": dataclasses.asdict(data_cfg.filters),
            "base_resolution": data_cfg.base_resolution}
