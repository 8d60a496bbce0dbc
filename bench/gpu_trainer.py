"""The whole trainer on one GPU, fed by the data service (bench/gpu_trainer.sh runs it; issue 24).

    python bench/gpu_trainer.py --out DIR            # one GPU: real shapes, about 7 minutes
    python bench/gpu_trainer.py --tiny --out DIR     # any machine: the same steps, tiny, on the CPU

1. Encoders with the release's shapes and random weights: the Wan-2.1-layout VAE
   (`AutoencoderKLQwenImage()`'s default config) and a Qwen2.5-VL-7B-shaped text encoder (28
   layers x 3584, the 32-block vision tower, vocabulary 152064) with mmdit's small BPE tokenizer,
   written as the Qwen-Image layout (`--tiny`: `mmdit make-tiny-encoders`).
2. Webdataset shards of square 1328 px images with captions; `mmdit produce` encodes them into
   the 1328 cache: its `encode_seconds` give the producer's encode throughput per GPU-second,
   set beside `mmdit capacity`'s figure for the same prompt length. The 640 cache is written
   directly with the encoders' shapes and random values (a second load of the 7B encoder would
   cost a minute of the budget and measure nothing new).
3. Per resolution, `mmdit serve` (one producer, reading the cache) and `mmdit train` at the 20B
   width (hidden 3072, MLP 12288, text 3584) with as many blocks as model/memory.py says fit the
   card (8 to 12), bf16, the megatron backend with the distributed optimizer, micro-batch 1:
   compiled and eager at 1328, compiled at 640; and the compiled 1328 run again fed by random
   latents of the same shapes (`train.data_source=random`) for the service-fed / random-fed ratio.
4. From each run's metrics.jsonl (warm-up steps left out): median step time, MFU, data-wait
   fraction, the loss curve, and the peak memory the trainer records, against model/memory.py's
   prediction of `max_memory_allocated`.

Results go to DIR/gpu_trainer.json, written after every stage, so a run cut short keeps what it
measured; training runs are started in priority order while `--budget-s` lasts (1328 compiled,
the same fed by random latents, 1328 eager, 640 compiled), each killed once it logged `--steps`
steps (the end-of-run checkpoint of a 20B-width model would take minutes and tens of GB). `--tiny` runs the same stages with the tiny encoders and model at 256 and 128 px, fp32
and the torch backend, eager only: it checks the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QWEN_VL_7B = {  # Qwen2.5-VL-7B-Instruct's config.json: the language model and the vision tower
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31]),
    "mrope_section": [16, 24, 24],
}
CAPTION_WORDS = ("red", "blue", "sign", "poster", "wooden", "reads", "OPEN", "street", "night", "cat", "letters",
                 "bold", "gradient", "title", "shop", "window", "paper", "green", "light", "shadow")


class Stage:
    """Runs the stages in order, records each one's result or its error, and writes the JSON."""

    def __init__(self, out: Path, meta: dict):
        self.path, self.result = out / "gpu_trainer.json", {**meta, "stages": {}}
        self.started = time.time()

    def run(self, name: str, fn, *args):
        t0 = time.time()
        try:
            value = fn(*args)
            self.result["stages"][name] = {"ok": True, "seconds": round(time.time() - t0, 1), "result": value}
            return value
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on to what does not depend on it
            self.result["stages"][name] = {"ok": False, "seconds": round(time.time() - t0, 1), "error": str(e)[-4000:]}
            print(f"stage {name} failed: {str(e)[-2000:]}", file=sys.stderr, flush=True)
            return None
        finally:
            self.result["wall_s"] = round(time.time() - self.started, 1)
            self.path.write_text(json.dumps(self.result, indent=1) + "\n")
            print(f"[{self.result['wall_s']:7.1f}s] {name}: {json.dumps(self.result['stages'][name])[:400]}", flush=True)


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"mmdit {args[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


# ----------------------------------------------------------------------------- encoders and data


def real_shape_encoders(out: Path) -> dict:
    """The release's encoder shapes with random weights, saved as the Qwen-Image layout."""
    import torch
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmdit.producer.tiny_encoders import build_tokenizer, image_processor, text_encoder_config

    tokenizer = build_tokenizer()
    config = text_encoder_config(tokenizer)
    for key, value in QWEN_VL_7B["text"].items():
        setattr(config.text_config, key, value)
    config.text_config.rope_parameters["mrope_section"] = QWEN_VL_7B["mrope_section"]
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    for key, value in QWEN_VL_7B["vision"].items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        AutoencoderKLQwenImage().save_pretrained(out / "vae")
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # 8.3B parameters: built in bf16, as they are stored
        try:
            model = Qwen2_5_VLForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "text_encoder")
    del model
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer.save_pretrained(out / "processor")
    image_processor().save_pretrained(out / "processor")
    return {"text_encoder_params": params, "dir": str(out)}


def tiny_encoders(out: Path) -> dict:
    cli("make-tiny-encoders", str(out), timeout=300)
    return {"dir": str(out)}


def write_shards(out: Path, n: int, side: int, words: int, seed: int = 0) -> dict:
    """`n` square photos-like images (smooth colour fields with noise, all distinct) with captions
    of `words` words, in shards of 16 samples."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for shard in range(0, n, 16):
        with tarfile.open(out / f"bench-{shard // 16:06d}.tar", "w") as tar:
            for i in range(shard, min(n, shard + 16)):
                a, b, c = rng.uniform(0, 1, 3)
                base = np.stack([a * xx + (1 - a) * yy, b * yy, c * (1 - xx)], -1)
                pixels = np.clip(base * 200 + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "JPEG", quality=90)
                caption = " ".join(rng.choice(CAPTION_WORDS, words))
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return {"samples": n, "side": side, "caption_words": words}


def produce(shards: Path, cache: Path, encoders: str, side: int, batch: int) -> dict:
    done = cli("produce", f"data.shards={shards}/*.tar", f"cache.dir={cache}", f"encoders.dir={encoders}",
               f"data.base_resolution={side}", f"data.encode_batch_size={batch}", timeout=900)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    if not report["encoded"]:
        raise RuntimeError(f"nothing encoded: {report}")
    prompt_tokens = prompt_lengths(cache)
    return {"encoded": report["encoded"], "encode_seconds": report["encode_seconds"], "seconds": report["seconds"],
            "encode_samples_per_gpu_s": report["encoded"] / report["encode_seconds"],
            "prompt_tokens_median": statistics.median(prompt_tokens), "rejected": report["rejected"]}


def direct_cache(cache_dir: Path, n: int, side: int, text_tokens: int, text_dim: int) -> dict:
    """A cache of `n` records with the shapes the encoders give (latents [16, side/8, side/8],
    prompt features [text_tokens, text_dim]) and random values, written without encoding: the
    second resolution's trainer needs shapes, and loading the 7B encoder again costs a minute."""
    import torch

    from mmdit.cache import LatentCache

    g = torch.Generator().manual_seed(1)
    LatentCache(cache_dir).write([
        {"key": f"d{i:05d}", "fingerprint": "gpu_trainer", "bucket": (side, side), "task": "t2i",
         "caption": f"sample {i}", "source": "bench", "latents": torch.randn(16, side // 8, side // 8, generator=g),
         "prompt_embeds": torch.randn(text_tokens, text_dim, generator=g)} for i in range(n)])
    return {"records": n, "side": side, "text_tokens": text_tokens}


def prompt_lengths(cache_dir: Path) -> list[int]:
    from mmdit.cache import LatentCache

    cache = LatentCache(cache_dir)
    lengths = []
    for fp in cache.fingerprints():
        for keys in cache.buckets(fp).values():
            lengths += [r["prompt_embeds"].shape[0] for r in cache.read_many(keys[:8], fp)]
    return lengths


def capacity_encode(side: int, prompt_tokens: int) -> dict:
    """`mmdit capacity`'s encode time per sample at this side and prompt length (text-to-image)."""
    from mmdit.config.model import MMDiTArgs
    from mmdit.launch.capacity import Assumptions, stage_figures, vae_encode_flops

    a = Assumptions(edit_fraction=0.0, prompt_tokens=int(prompt_tokens))
    fig = stage_figures(MMDiTArgs(), a, side, vae_encode_flops(side))
    return {"encode_s_per_sample": fig["encode_s_per_sample_on_one_gpu"],
            "samples_per_gpu_s": 1 / fig["encode_s_per_sample_on_one_gpu"],
            "assumptions": {"vae_mfu": a.vae_mfu, "mllm_mfu": a.mllm_mfu, "peak_tflops": a.peak_tflops}}


# ----------------------------------------------------------------------------- training runs


def choose_blocks(tiny: bool, side: int, text_tokens: int) -> dict:
    """The most 20B-width blocks (12 down to 8) that model/memory.py says fit this card with
    recompute none (else elementwise, else full), with room for the allocator."""
    from mmdit.config.model import MMDiTArgs
    from mmdit.model.memory import GIB, Layout, predict

    if tiny:
        return {"blocks": 2, "recompute": "none"}
    import torch

    capacity = torch.cuda.get_device_properties(0).total_memory
    for policy in ("none", "elementwise", "full"):
        for blocks in range(12, 7, -1):
            m = predict(MMDiTArgs(num_layers=blocks), Layout(recompute=policy, height=side, width=side,
                                                             text_tokens=text_tokens))
            if m.total <= 0.92 * capacity:
                return {"blocks": blocks, "recompute": policy, "predicted_total_gib": m.total / GIB,
                        "card_gib": capacity / GIB}
    raise RuntimeError("not even 8 blocks fit with full recompute")


def predicted_allocated(tiny: bool, blocks: int, policy: str, side: int, text_tokens: int) -> float | None:
    from mmdit.config.model import MMDiTArgs
    from mmdit.model.memory import GIB, Layout, predict

    if tiny:
        return None
    return predict(MMDiTArgs(num_layers=blocks), Layout(recompute=policy, height=side, width=side,
                                                         text_tokens=text_tokens)).allocated / GIB


def model_overrides(tiny: bool, blocks: int, policy: str, compile_: bool) -> list[str]:
    common = [f"parallel.recompute={policy}", f"parallel.compile={str(compile_).lower()}", "train.micro_batch_size=1",
              "train.tensorboard=false", "checkpoint.every=0", "eval.every=0", "optimizer.warmup_steps=2"]
    if tiny:
        return ["model=tiny", "parallel.backend=torch", "train.dtype=fp32", *common]
    return ["model=qwen_image_20b", f"model.num_layers={blocks}", "parallel.backend=megatron", "train.dtype=bf16",
            *common]


def train(run: Path, overrides: list[str], steps: int, warmup: int, predicted_gib: float | None,
          timeout: float) -> dict:
    """`mmdit train` until metrics.jsonl holds `steps` steps, then killed: a run's end always
    checkpoints, and at the 20B width that is tens of GB of disk and minutes this run has not got."""
    run.mkdir(parents=True, exist_ok=True)
    log = (run / "train.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run}",
                             "checkpoint.resume=false", f"train.steps={steps + 10_000}", *overrides],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline, records = run / "metrics.jsonl", time.monotonic() + timeout, []
    try:
        while len(records) < steps:
            if proc.poll() is not None:
                raise RuntimeError(f"mmdit train exited {proc.returncode}:\n{(run / 'train.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(records)} of {steps} steps in {timeout:.0f}s")
            time.sleep(0.5)
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            records = [r for r in map(json.loads, lines[:-1] if lines and not lines[-1].endswith("}") else lines)
                       if "step_time_s" in r]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # the whole session: torchrun's ranks too
            proc.wait()
        log.close()
    records = records[:steps]
    steady = records[warmup:] or records
    peak = max((r.get("peak_memory_gib") or 0.0) for r in records) or None
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {
        "steps": len(records), "warmup_steps_left_out": warmup,
        "step_time_s_median": statistics.median(r["step_time_s"] for r in steady),
        "mfu_median": statistics.median(mfus) if mfus else None,
        "tflops_per_gpu_median": statistics.median(r["tflops_per_gpu"] for r in steady),
        "data_wait_fraction_mean": statistics.fmean(r["data_wait_fraction"] for r in steady),
        "losses": [round(r["loss"], 5) for r in records],
        "first_step_s": records[0]["step_time_s"],
        "peak_memory_gib": peak, "predicted_allocated_gib": predicted_gib,
        "peak_over_predicted": peak / predicted_gib if peak and predicted_gib else None,
    }


def serve_and_train(cache: Path, side: int, work: Path, name: str, overrides: list[str], steps: int, warmup: int,
                    predicted_gib, timeout: float) -> dict:
    from mmdit.utils.processes import ServeProcess

    data = [f"cache.dir={cache}", f"data.base_resolution={side}", "train.micro_batch_size=1"]
    serve = ServeProcess([*data, f"run.dir={work / (name + '-service')}", "service.producers=1", "service.dp_size=1",
                          "checkpoint.resume=false"], timeout=300)
    try:
        return train(work / name, [*overrides, *data, "train.data_source=service", *serve.client_overrides], steps,
                     warmup, predicted_gib, timeout)
    finally:
        serve.stop()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    p.add_argument("--work", default=None, help="scratch directory, not sent back (default: DIR/work)")
    p.add_argument("--tiny", action="store_true", help="tiny encoders and model on the CPU: the plumbing only")
    p.add_argument("--samples", type=int, default=None, help="images per resolution (default 32; tiny 8)")
    p.add_argument("--steps", type=int, default=None, help="steps per training run (default 14; tiny 4)")
    p.add_argument("--skip", default="", help="comma-separated runs to leave out: eager, 640, random")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no training run past this many seconds (default 400; tiny 900)")
    ns = p.parse_args(argv)
    tiny = ns.tiny
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work) if ns.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    samples = ns.samples or (8 if tiny else 32)
    steps = ns.steps or (4 if tiny else 14)
    warmup = 1 if tiny else 4  # compile and allocator warm-up happen in the first steps
    sides = (256, 128) if tiny else (1328, 640)
    skip = {s.strip() for s in ns.skip.split(",") if s.strip()}
    ns.budget_s = ns.budget_s or (900 if tiny else 400)

    import torch

    device = "cpu" if tiny else torch.cuda.get_device_name()
    stage = Stage(out, {"benchmark": "gpu_trainer", "tiny": tiny, "device": device, "torch": torch.__version__,
                        "command": " ".join(["python", "bench/gpu_trainer.py", *(argv or sys.argv[1:])]),
                        "budget_s": ns.budget_s})
    enc_dir = work / "encoders"
    if stage.run("encoders", tiny_encoders if tiny else real_shape_encoders, enc_dir) is None:
        return 1
    big, small = sides
    shards = work / f"shards-{big}"
    stage.run(f"shards_{big}", write_shards, shards, samples, big, 12)
    produced = stage.run(f"produce_{big}", produce, shards, work / f"cache-{big}", str(enc_dir), big, 4 if tiny else 8)
    if produced is None:
        return 1
    text = int(produced["prompt_tokens_median"])
    if not tiny:
        stage.run(f"capacity_encode_{big}", capacity_encode, big, text)
    text_dim = 64 if tiny else 3584
    stage.run(f"cache_{small}", direct_cache, work / f"cache-{small}", samples, small, text, text_dim)
    layout = stage.run("blocks", choose_blocks, tiny, big, text)  # one block count for both resolutions
    if layout is None:
        return 1
    blocks, policy = layout["blocks"], layout["recompute"]
    compiled = not tiny
    mode = "compiled" if compiled else "eager"
    random = [f"train.random_height={big}", f"train.random_width={big}", f"train.random_text_len={text}",
              "train.data_source=random"]
    runs = [  # by priority: what the budget cuts comes last
        (f"train_{big}_{mode}", big, compiled, None),
        (f"train_{big}_{mode}_random", big, compiled, random),
        (f"train_{big}_eager", big, False, None),
        (f"train_{small}_{mode}", small, compiled, None),
    ]
    for name, side, compile_, random_data in runs:
        if name in stage.result["stages"] or any(tag in skip for tag in name.split("_")):
            continue
        left = ns.budget_s - (time.time() - stage.started)
        if left < (60 if tiny else 100):
            stage.result["stages"][name] = {"ok": True, "skipped": f"{left:.0f}s of the budget left"}
            continue
        overrides = model_overrides(tiny, blocks, policy, compile_)
        predicted = predicted_allocated(tiny, blocks, policy, side, text)
        if random_data:
            stage.run(name, train, work / name, [*overrides, *random_data], steps, warmup, predicted, left)
        else:
            stage.run(name, serve_and_train, work / f"cache-{side}", side, work, name, overrides, steps, warmup,
                      predicted, left)

    summarize(stage, big, tiny)
    return 0 if all(s["ok"] for s in stage.result["stages"].values()) else 1


def summarize(stage: Stage, big: int, tiny: bool) -> None:
    s = {k: v["result"] for k, v in stage.result["stages"].items() if v["ok"] and "result" in v}
    mode = "eager" if tiny else "compiled"
    service, random = s.get(f"train_{big}_{mode}"), s.get(f"train_{big}_{mode}_random")
    summary = {}
    if service and random:
        summary["service_over_random_step_time"] = random["step_time_s_median"] / service["step_time_s_median"]
        if service["mfu_median"] and random["mfu_median"]:
            summary["service_over_random_mfu"] = service["mfu_median"] / random["mfu_median"]
    if service:
        summary[f"mfu_{big}_{mode}"] = service["mfu_median"]
        summary["peak_over_predicted"] = service["peak_over_predicted"]
    eager = s.get(f"train_{big}_eager")
    if service and eager and not tiny:
        summary["compiled_speedup"] = eager["step_time_s_median"] / service["step_time_s_median"]
        summary["loss_gap_compiled_vs_eager"] = max(abs(a - b) for a, b in zip(service["losses"], eager["losses"]))
    produced, model = s.get(f"produce_{big}"), s.get(f"capacity_encode_{big}")
    if produced and model:
        summary["encode_measured_over_capacity_model"] = produced["encode_samples_per_gpu_s"] / model["samples_per_gpu_s"]
    stage.result["summary"] = summary
    stage.path.write_text(json.dumps(stage.result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
