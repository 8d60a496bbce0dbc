"""`mmdit capacity [model=...] [--trainer-gpus N ...] [--markdown]`: how big the data side must be.

From the model's training FLOPs (model/flops.py) and the encoders' FLOPs (the Wan-2.1-layout VAE
counted exactly on the meta device with `FlopCounterMode`; Qwen2.5-VL-7B as 2 x parameters x
tokens), for each curriculum stage (256, 640, 1328 px, square buckets of the same area):

- trainer throughput: samples/s per GPU at an assumed MFU;
- producer GPUs per trainer GPU to encode everything the trainers consume (the first epoch: the
  cache makes later epochs reads only), at assumed encoder utilizations;
- the network: bytes per sample a producer sends (fp32 latents + prompt features, what the cache
  holds) and what that makes per trainer GPU and per 8-GPU node;
- the coordinator: operations per second for N trainer GPUs (one lease per global batch, one
  locate and one ack per DP rank and batch, before acks are grouped).

Every assumption is a flag and is printed with the result: replace them with GPU measurements
(bench/gpu_smoke.sh reports MFU; encoder MFU from a producer's `encode_seconds`).

`--memory`: per-GPU memory instead (model/memory.py) for the layouts of a job of `--trainer-gpus`
GPUs at one resolution (`--resolution`, `--micro-batch`, `--prompt-tokens`): every TP size with and
without sequence parallelism, each recompute policy, and LoRA at TP 1; which fit 80 GB and 141 GB
GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass, fields

from mmdit.launch.args import Action, Command, Flag, flags_of, parse

STAGES = (256, 640, 1328)
MLLM_PARAMS = 7.07e9
"""Qwen2.5-VL-7B's language model without embeddings (28 layers x hidden 3584, GQA, MLP 18944)."""
VIT_PARAMS = 0.67e9
"""Its vision tower (32 blocks x 1280), run on 4 patches per vision token before the 2x2 merge."""
TEXT_DIM = 3584
TEMPLATE_TOKENS = (34, 64)
"""Prompt-template prefix tokens Qwen-Image drops: text-to-image, edit."""


@dataclass
class Assumptions:
    """What the figures assume; each field is a flag (`trainer_gpus` is `--trainer-gpus`)."""

    trainer_gpus: int = 512
    """Trainer GPUs of the job (for the coordinator's load)."""
    tp: int = 8
    """Tensor-parallel size: DP = trainer_gpus / tp ranks fetch batches."""
    global_batch: int = 2048
    """Samples per optimizer step."""
    peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU (H100/H200 SXM)."""
    trainer_mfu: float = 0.40
    """The trainers' model FLOPs utilization."""
    vae_mfu: float = 0.20
    """VAE encoder (3-D convolutions, memory bound) utilization on a producer GPU."""
    mllm_mfu: float = 0.30
    """Qwen2.5-VL prefill utilization on a producer GPU."""
    prompt_tokens: int = 256
    """Typical prompt length after the template prefix (Qwen-Image keeps at most 1024)."""
    edit_fraction: float = 0.2
    """Share of edit samples (their source image is encoded too and seen by the MLLM)."""
    edit_vision_tokens: int = 190
    """Vision tokens of an edit source (384 x 384 area, QwenImageEditPlusPipeline)."""


def vae_encode_flops(side: int) -> float:
    import torch
    from diffusers import AutoencoderKLQwenImage
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()  # the default config is the release's
        x = torch.empty(1, 3, 1, side, side)
    with FlopCounterMode(display=False) as counter:
        vae.encode(x)
    return float(counter.get_total_flops())


def stage_figures(args, a: Assumptions, side: int, vae_flops: float) -> dict:
    from mmdit.model.flops import step_flops

    tokens = (side // 16) ** 2
    t2i = step_flops(args, 1, tokens, a.prompt_tokens)
    edit = step_flops(args, 1, tokens, a.prompt_tokens + a.edit_vision_tokens, cond_image_tokens=tokens)
    train_flops = (1 - a.edit_fraction) * t2i + a.edit_fraction * edit
    trainer_sps = a.trainer_mfu * a.peak_tflops * 1e12 / train_flops
    peak = a.peak_tflops * 1e12
    mllm_t2i = 2 * MLLM_PARAMS * (a.prompt_tokens + TEMPLATE_TOKENS[0])
    mllm_edit = (2 * MLLM_PARAMS * (a.prompt_tokens + TEMPLATE_TOKENS[1] + a.edit_vision_tokens)
                 + 2 * VIT_PARAMS * 4 * a.edit_vision_tokens)
    mllm = (1 - a.edit_fraction) * mllm_t2i + a.edit_fraction * mllm_edit
    vae = vae_flops * (1 + a.edit_fraction)  # an edit encodes its source image too
    encode_s = vae / (peak * a.vae_mfu) + mllm / (peak * a.mllm_mfu)
    latent_bytes = 16 * (side // 8) ** 2 * 4 * (1 + a.edit_fraction)
    text_bytes = (a.prompt_tokens + a.edit_fraction * a.edit_vision_tokens) * TEXT_DIM * 4
    sample_bytes = latent_bytes + text_bytes
    return {
        "side": side, "image_tokens": tokens, "train_tflop_per_sample": train_flops / 1e12,
        "trainer_samples_per_s_per_gpu": trainer_sps,
        "vae_tflop_per_image": vae_flops / 1e12, "mllm_tflop_per_sample": mllm / 1e12,
        "encode_s_per_sample_on_one_gpu": encode_s,
        "producer_gpus_per_trainer_gpu": trainer_sps * encode_s,
        "bytes_per_sample": sample_bytes,
        "network_gb_per_s_per_trainer_gpu": trainer_sps * sample_bytes / 1e9,
        "network_gb_per_s_per_8gpu_node": 8 * trainer_sps * sample_bytes / 1e9,
        "coordinator_ops_per_s": coordinator_ops(a, trainer_sps),
    }


def coordinator_ops(a: Assumptions, trainer_sps: float) -> float:
    dp = a.trainer_gpus // a.tp
    batches_per_s = a.trainer_gpus * trainer_sps / a.global_batch
    return batches_per_s * (1 + 2 * dp)  # a lease, and a locate plus an ack per DP rank


GPU_GIB = {"80 GB": 79.6, "141 GB": 140.4}
"""Usable memory of an H100 80 GB and an H200 141 GB (nvidia-smi's totals, 81559 and 143771 MiB)."""


@dataclass
class MemoryAssumptions:
    """What `--memory` assumes beyond `--trainer-gpus` and `--prompt-tokens`; each a flag."""

    resolution: int = 1328
    """Square image side in pixels."""
    micro_batch: int = 1
    """Samples per micro-batch on one DP rank."""
    lora_rank: int = 64
    """Rank of the LoRA rows (attention and MLP linears adapted, as train.lora's default)."""
    workspace_gib: float = 3.0
    """CUDA context, cuBLAS and NCCL buffers per GPU."""
    fragmentation: float = 0.10
    """Share of activation memory the caching allocator cannot reuse."""


def memory_table(model_args, a: Assumptions, m: MemoryAssumptions) -> dict:
    from mmdit.model.memory import GIB, layouts, predict

    rows = []
    for layout in layouts(a.trainer_gpus, lora_rank=m.lora_rank, micro_batch=m.micro_batch, height=m.resolution,
                          width=m.resolution, text_tokens=a.prompt_tokens):
        memory = predict(model_args, layout, m.workspace_gib, m.fragmentation)
        gib = {k: v / GIB for k, v in memory.as_dict().items()}
        rows.append({"layout": layout.describe(), **dataclasses.asdict(layout), "gib": gib,
                     "fits": {gpu: gib["total"] <= cap for gpu, cap in GPU_GIB.items()}})
    return {"assumptions": {**asdict(m), "trainer_gpus": a.trainer_gpus, "prompt_tokens": a.prompt_tokens,
                            "gpu_gib": GPU_GIB}, "layouts": rows}


def memory_markdown(result: dict) -> str:
    gpus = list(GPU_GIB)
    rows = ["| layout | parameters | gradients | optimizer | activations | workspace | total GiB | "
            + " | ".join(f"fits {g}" for g in gpus) + " |", "|---" * (7 + len(gpus)) + "|"]
    for r in result["layouts"]:
        g = r["gib"]
        fits = " | ".join("yes" if r["fits"][gpu] else "no" for gpu in gpus)
        rows.append(f"| {r['layout']} | {g['parameters']:.1f} | {g['gradients']:.1f} | {g['optimizer']:.1f} | "
                    f"{g['activations']:.1f} | {g['workspace']:.1f} | {g['total']:.1f} | {fits} |")
    return "\n".join(rows)


def compute(model_args, a: Assumptions) -> dict:
    return {"assumptions": asdict(a), "stages": [stage_figures(model_args, a, s, vae_encode_flops(s)) for s in STAGES]}


def markdown(result: dict) -> str:
    rows = ["| stage | train TFLOP/sample | samples/s per trainer GPU | encode s/sample (1 GPU) | producer GPUs per "
            "trainer GPU | MB/sample | GB/s per 8-GPU node | coordinator ops/s |", "|---|---|---|---|---|---|---|---|"]
    for s in result["stages"]:
        rows.append(f"| {s['side']} | {s['train_tflop_per_sample']:.2f} | {s['trainer_samples_per_s_per_gpu']:.2f} | "
                    f"{s['encode_s_per_sample_on_one_gpu']:.4f} | {s['producer_gpus_per_trainer_gpu']:.2f} | "
                    f"{s['bytes_per_sample'] / 1e6:.2f} | {s['network_gb_per_s_per_8gpu_node']:.2f} | "
                    f"{s['coordinator_ops_per_s']:.0f} |")
    return "\n".join(rows)


COMMAND = Command("capacity", __doc__, sections=("model",), actions=(Action(
    flags=(*flags_of(Assumptions), *flags_of(MemoryAssumptions), Flag("markdown", "a table instead of JSON"),
           Flag("memory", "per-GPU memory of training layouts (model/memory.py) instead of the data side"))),))


def main(argv: list[str]) -> int:
    from mmdit.config.loader import load_config

    args = parse(COMMAND, argv)
    cfg = load_config(args.overrides or ["model=qwen_image_20b"])
    a = Assumptions(**{f.name: getattr(args.flags, f.name) for f in fields(Assumptions)})
    if args.flags.memory:
        m = MemoryAssumptions(**{f.name: getattr(args.flags, f.name) for f in fields(MemoryAssumptions)})
        result = memory_table(cfg.model, a, m)
        print(memory_markdown(result) if args.flags.markdown else json.dumps(result, indent=1))
        return 0
    result = compute(cfg.model, a)
    print(markdown(result) if args.flags.markdown else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
