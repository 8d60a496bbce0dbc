"""What text-rendering evaluation costs: OCR images/s, and the share of a run's time that
evaluating every N steps would take.

1. OCR throughput (the engine `mmdit eval` reads with: RapidOCR, onnxruntime, CPU): images/s
   over `--images` images per kind and size: clean renderings of known text (the synthetic
   renderer's complex layouts, resized) and noise (what a young model draws), at 512 and 1024
   pixels a side; plus the word accuracy it reads the renderings with (a sanity check).
2. Overhead, measured on one run: `mmdit train` of the tiny model for `--steps` steps (random
   data, a checkpoint at the end), then `mmdit eval` of that checkpoint with `--prompts` prompts
   at `--size` pixels and `--sample-steps` Euler steps. An evaluation inside training keeps the
   model, encoders and OCR engine loaded, so what it pays each time is generation + OCR + scoring
   (`per_evaluation_s`, from the command's own timings; `command_seconds` adds process start and
   loading). The overhead of evaluating every N steps is per_evaluation_s / (N x median step
   seconds), for several N. Both sides use the same machine, model and moment; at real scale the
   ratio changes with the model (generation dominates) and the prompt count.

    python bench/eval.py [--images 8 --steps 20 --prompts 6 --size 256]  ->  bench/results/eval.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).parent / "results"


def renderings(n: int, side: int) -> tuple[list[Image.Image], list]:
    """`n` complex renderings of known text (the synthetic renderer's), resized to side x side."""
    from mmdit.config.produce import SynthConfig
    from mmdit.consumer.text_eval import TextPrompt
    from mmdit.producer.synth.shards import make_sample

    cfg = SynthConfig(kinds={"complex": 1.0}, edit_fraction=0.0, seed=1)
    images, prompts = [], []
    for i in range(n):
        sample = make_sample(i, cfg)
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample.get("png") or sample["jpg"])).convert("RGB")
        images.append(image.resize((side, side), Image.Resampling.LANCZOS))
        prompts.append(TextPrompt(str(i), "", tuple(b["text"] for b in meta["layout"]), meta["lang"], "multi_region"))
    return images, prompts


def ocr_throughput(engine, n: int) -> dict:
    from mmdit.consumer.text_eval import score_images, summarize

    out = {}
    for side in (512, 1024):
        images, prompts = renderings(n, side)
        noise = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8))
                 for i in range(n)]
        engine.read(images[0])  # warm-up: first-call allocations
        for kind, batch in (("rendering", images), ("noise", noise)):
            t0 = time.perf_counter()
            scored = score_images(batch, prompts, engine)
            seconds = time.perf_counter() - t0
            entry = {"images": n, "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 3)}
            if kind == "rendering":
                entry["word_accuracy"] = summarize(scored)["word_accuracy"]
            out[f"{kind}_{side}"] = entry
    return out


def run(cmd: list[str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", *cmd], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if done.returncode:
        raise RuntimeError(f"mmdit {cmd[0]} failed: {done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - t0


def overhead(work: Path, args) -> dict:
    encoders = work / "encoders"
    run(["make-tiny-encoders", str(encoders)])
    train = work / "run"
    run(["train", f"run.dir={train}", f"train.steps={args.steps}", f"checkpoint.every={args.steps}",
         "train.random_height=256", "train.random_width=256", f"encoders.dir={encoders}", "train.tensorboard=false"])
    steps = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["step_time_s"] for r in steps if not r.get("eval"))
    stdout, eval_s = run(["eval", str(train), f"limit={args.prompts}", f"width={args.size}", f"height={args.size}",
                          f"steps={args.sample_steps}"])
    summary = json.loads(stdout.strip().splitlines()[-1])
    per_eval = summary["prompts"] / summary["images_per_second"] + summary["score_seconds"]
    return {
        "model": "tiny (conf/model/tiny.yaml), CPU", "train_steps": args.steps, "median_step_s": round(step_s, 4),
        "eval": {"prompts": summary["prompts"], "size": args.size, "sample_steps": args.sample_steps,
                 "per_evaluation_s": round(per_eval, 2), "command_seconds": round(eval_s, 2),
                 "images_per_second": summary["images_per_second"],
                 "ocr_seconds_per_image": summary["ocr_seconds_per_image"], "score_seconds": summary["score_seconds"],
                 "word_accuracy": summary["word_accuracy"]},
        "overhead_every_n_steps": {str(n): round(per_eval / (n * step_s), 4) for n in (100, 500, 1000, 5000)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="images per kind and size for the OCR figures")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the run evaluated")
    parser.add_argument("--prompts", type=int, default=6, help="prompts of the built-in set evaluated")
    parser.add_argument("--size", type=int, default=256, help="side of the evaluated images")
    parser.add_argument("--sample-steps", type=int, default=8, help="Euler steps per evaluated image")
    parser.add_argument("--out", default=str(RESULTS / "eval.json"))
    args = parser.parse_args()

    from mmdit.consumer.text_eval import OcrEngine

    engine = OcrEngine()
    result = {"engine": engine.name, "cpus": os.cpu_count(), "ocr": ocr_throughput(engine, args.images)}
    with tempfile.TemporaryDirectory() as work:
        result["overhead"] = overhead(Path(work), args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
