"""One text-rendering evaluation: generate the prompt set with the current weights, read every
image with the OCR engine, score it, and write the images, results.json and index.html.

`score_images` scores images that already exist (the calibration test, the benchmark);
`TextRenderingEval.run` generates them first with a `Sampler` (consumer/sample.py): prompt i
from the noise of `seed + i`, so two evaluations of the same weights make the same images and
a series of them shows only what training changed.

The summary (what metrics.jsonl records, see `eval_record`):

    {"eval": "text_rendering", "prompts": 100, "word_accuracy": 0.41, "one_minus_ned": 0.38,
     "alignment": 0.27, "by_language": {"en": {...}, "zh": {...}}, "by_kind": {"single_line": {...},
     "multi_region": {...}, "paragraph": {...}}, "images_per_second": ..., "ocr_seconds_per_image": ...,
     "engine": "rapidocr 3.10.0 (...)", "prompt_set": "builtin", "settings": {...}}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from PIL import Image

from mmdit.config.text_eval import TextEvalConfig
from mmdit.consumer.text_eval.ocr import OcrEngine
from mmdit.consumer.text_eval.page import render_page
from mmdit.consumer.text_eval.prompts import TextPrompt, load_prompts, subset
from mmdit.consumer.text_eval.scoring import score_reading, summarize
from mmdit.utils.atomic import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger("mmdit.eval")

EVAL_KIND = "text_rendering"
RESULTS = "results.json"
PAGE = "index.html"


def eval_dir(run_dir: Path, step: int) -> Path:
    """Where a run's evaluation at `step` is written: run.dir/eval/step_N/."""
    return Path(run_dir) / "eval" / f"step_{step:08d}"


def score_images(images: list[Image.Image], prompts: list[TextPrompt], engine: OcrEngine,
                 alignment=None) -> list[dict]:
    """Per image: its prompt, the OCR reading, `scoring.score_reading`'s figures, the alignment
    of image and prompt (an `AlignmentScorer`; None: not scored) and the OCR time."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    results = []
    for image, prompt in zip(images, prompts):
        t0 = time.perf_counter()
        reading = engine.read(image)
        results.append({**prompt.to_dict(), "reading": reading.to_dict(),
                        **score_reading(prompt.target_texts, reading.lines),
                        "ocr_seconds": round(time.perf_counter() - t0, 4)})
    scores = alignment.score(images, [p.prompt for p in prompts]) if alignment is not None and images else None
    for r, s in zip(results, scores or [None] * len(results)):
        r["alignment"] = None if s is None else round(float(s), 4)
    return results


class TextRenderingEval:
    """The prompt set, the engine and the alignment scorer, loaded once; `run` per evaluation."""

    def __init__(self, cfg: TextEvalConfig, engine: OcrEngine | None = None, alignment=None):
        self.cfg = cfg
        self.prompts = subset(load_prompts(cfg.prompts or None), cfg.limit)
        self.engine = engine or OcrEngine(cfg.ocr_threads)
        self.alignment = alignment

    def sample_config(self, index: int):
        from mmdit.consumer.sample import SampleConfig

        c = self.cfg
        return SampleConfig(c.width, c.height, c.steps, c.true_cfg_scale, c.negative_prompt, c.seed + index)

    def generate(self, sampler, progress=None) -> tuple[list[Image.Image], float]:
        """Every prompt's image, and the seconds it took."""
        t0 = time.perf_counter()
        images = [sampler.generate(p.prompt, self.sample_config(i), progress=progress)
                  for i, p in enumerate(self.prompts)]
        return images, time.perf_counter() - t0

    def run(self, sampler, out: Path | None, progress=None) -> dict:
        """Generate, read, score; write the images and the page to `out` (None: nothing
        written). Returns the summary (module docstring); the sampler's model is left in eval mode."""
        images, gen_seconds = self.generate(sampler, progress)
        t0 = time.perf_counter()
        results = score_images(images, self.prompts, self.engine, self.alignment)
        score_seconds = time.perf_counter() - t0
        summary = {"eval": EVAL_KIND, **summarize(results),
                   "images_per_second": round(len(images) / gen_seconds, 4) if gen_seconds > 0 else None,
                   "ocr_seconds_per_image": round(sum(r["ocr_seconds"] for r in results) / max(1, len(results)), 4),
                   "score_seconds": round(score_seconds, 3), "engine": self.engine.name,
                   "prompt_set": self.cfg.prompts or "builtin", "settings": self.settings()}
        if out is not None:
            write_results(Path(out), images, results, summary)
        return summary

    def settings(self) -> dict:
        c = self.cfg
        return {"width": c.width, "height": c.height, "steps": c.steps, "true_cfg_scale": c.true_cfg_scale,
                "negative_prompt": c.negative_prompt, "seed": c.seed, "limit": c.limit,
                "alignment_model": getattr(self.alignment, "name", None)}


def write_results(out: Path, images: list[Image.Image], results: list[dict], summary: dict) -> None:
    """NNN.png per image, results.json ({"summary", "images"}) and index.html; the page and the
    results last, so they never name an image not written yet."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, r) in enumerate(zip(images, results)):
        r["file"] = f"{i:03d}.png"
        with atomic_path(out / r["file"]) as tmp:
            image.save(tmp, format="PNG")
    atomic_write_json(out / RESULTS, {"summary": summary, "images": results}, indent=1)
    atomic_write_text(out / PAGE, render_page(summary, results, f"Text rendering: {out.name}"))


def read_results(out: Path) -> dict:
    return json.loads((Path(out) / RESULTS).read_text())
