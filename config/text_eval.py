"""Text-rendering evaluation: generate a fixed prompt set, read it with OCR, score it
(consumer/text_eval/). `mmdit eval` takes these as its keys; a trainer evaluating every N steps
takes the same settings."""

from dataclasses import dataclass


@dataclass
class TextEvalConfig:
    prompts: str = ""
    """A JSONL prompt set (one {"prompt", "target_texts", "language", "kind"} object per line);
    "": the built-in set of 100 English and Chinese prompts (consumer/text_eval/text_rendering.jsonl)."""
    limit: int = 0
    """Evaluate at most this many prompts (0: all), taken in turn from each (language, kind)
    group so a small subset still covers both languages and every kind."""
    width: int = 1024
    """Width of the generated images (a multiple of 16)."""
    height: int = 1024
    """Height of the generated images (a multiple of 16)."""
    steps: int = 30
    """Euler steps of the flow sampler per image."""
    true_cfg_scale: float = 4.0
    """True classifier-free guidance scale (1: none)."""
    negative_prompt: str | None = None
    """The negative prompt of CFG; unset: " " (as `mmdit sample`)."""
    seed: int = 0
    """Prompt i starts from the noise of seed + i: the same images for the same weights."""
    alignment_model: str = "auto"
    """A local CLIP or SigLIP directory scoring image-prompt alignment; auto: <encoders>/alignment
    when it exists, else none; none: no alignment score."""
    ocr_threads: int = 0
    """CPU threads of the OCR engine (0: onnxruntime's default, every core)."""

    def __post_init__(self):
        if self.limit < 0 or self.ocr_threads < 0:
            raise ValueError(f"limit and ocr_threads must be >= 0, got {self.limit}, {self.ocr_threads}")
        if self.width <= 0 or self.height <= 0 or self.width % 16 or self.height % 16:
            raise ValueError(f"width and height must be positive multiples of 16, got {self.width}x{self.height}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2, got {self.steps}")
