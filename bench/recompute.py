"""Activation recompute benchmark: peak activation memory and step time per policy, one run.

    python bench/recompute.py                          # CPU, fp32: activations dominate
    python bench/recompute.py --device cuda --dtype bf16
    python bench/recompute.py --slice --device cuda --dtype bf16   # 20B-width slice: TFLOP/s, MFU
    python bench/recompute.py --slice --layers 1 --heads 2 --resolution 256   # slice, reduced, CPU

Every policy of parallel/recompute.py (none, full, attention, mlp, every_k) runs on the SAME model
and batch in one process; memory is measured once per policy (deterministic), step times are the
minimum of `--repeats` forward+backward steps (no optimizer) taken round-robin over the policies.
The result says each policy's memory and time relative to `none`, and whether `full` meets the
issue's target (peak activation memory <= 40% of none at <= 1.4x step time).

`--slice` runs a few blocks at the released width (24 heads x 128 = 3072, MLP 12288, text
dim 3584) on a 1328x1328 image (6889 packed tokens): per-block cost is what the 60-block model
pays, so its TFLOP/s and MFU (model/flops.py conventions: model FLOPs, recompute excluded) are
the 20B model's, minus optimizer and communication.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import (  # bench/ is a scripts folder: run as `python bench/recompute.py`
    DTYPES,
    BatchShape,
    StepTime,
    args_dict,
    build_model,
    environment,
    make_batch,
    measure_memory,
    median,
    rope_axes,
    time_step,
    timed_rounds,
    train_step,
    write_json,
)

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import RECOMPUTE_POLICIES, ParallelConfig
from mmdit.model.flops import mfu, model_params, peak_flops, recompute_extra_flops, step_flops
from mmdit.parallel.recompute import apply_recompute

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_PEAK_RATIO, TARGET_TIME_RATIO = 0.40, 1.40

# Defaults per mode; command-line flags override each.
MODES = {
    # Small enough for 2 CPU cores (< 2 min for all five policies), activation-dominated:
    # ~15M parameters (58 MB fp32) against ~330 MB of activations at 2 x (1024 + 64) tokens.
    "recompute": dict(layers=6, heads=4, head_dim=64, joint_dim=512, resolution=512, text_tokens=64,
                      batch=2, policies="none,full,attention,mlp,every_k,elementwise", repeats=5, warmup=1),
    # The released width; 4 of its 60 blocks.
    "slice": dict(layers=4, heads=24, head_dim=128, joint_dim=3584, resolution=1328, text_tokens=256,
                  batch=1, policies="none,full,elementwise", repeats=5, warmup=2),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", action="store_true", help="20B-width slice (TFLOP/s and MFU) instead of the small config")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fp32 (CPU default) or bf16 (CUDA default)")
    p.add_argument("--layers", type=int, help="blocks")
    p.add_argument("--heads", type=int, help="attention heads (hidden = heads * head_dim)")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--joint-dim", type=int, help="text encoder width (joint_attention_dim)")
    p.add_argument("--resolution", type=int, help="square image side in pixels (multiple of 16)")
    p.add_argument("--height", type=int, help="image height in pixels (overrides --resolution)")
    p.add_argument("--width", type=int, help="image width in pixels (overrides --resolution)")
    p.add_argument("--text-tokens", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--policies", help=f"comma-separated, from {','.join(RECOMPUTE_POLICIES)}")
    p.add_argument("--every", type=int, default=2, help="k of every_k")
    p.add_argument("--repeats", type=int, help="timed steps per policy")
    p.add_argument("--warmup", type=int, help="untimed steps before measuring (then one memory step per policy)")
    p.add_argument("--linear-layers", choices=["auto", "local", "te"], default="auto",
                   help="auto: Transformer Engine when importable on CUDA")
    p.add_argument("--attention", choices=["sdpa", "varlen", "te"], default="sdpa", help="attention kernel")
    p.add_argument("--text-valid", type=int, help="pad text after this many tokens (all samples but the first)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--peak-tflops", type=float, help="device peak bf16 TFLOP/s for MFU (default: by device name)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads on --device cpu (default 1: on a shared machine a descheduled "
                        "OpenMP thread stalls every parallel region, turning others' load into 3-10x outliers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default bench/results/<mode>_<device>.json)")
    ns = p.parse_args(argv)
    for key, value in MODES["slice" if ns.slice else "recompute"].items():
        if getattr(ns, key) is None:
            setattr(ns, key, value)
    ns.dtype = ns.dtype or ("bf16" if ns.device.startswith("cuda") else "fp32")
    ns.policies = [x.strip() for x in ns.policies.split(",") if x.strip()]
    bad = [x for x in ns.policies if x not in RECOMPUTE_POLICIES]
    if bad or not ns.policies:
        p.error(f"--policies: unknown {bad}; choose from {RECOMPUTE_POLICIES}")
    if ns.repeats < 1 or ns.warmup < 1:
        p.error("--repeats and --warmup must be >= 1 (warm-up creates the gradients memory is measured against)")
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    return ns


def model_args(ns: argparse.Namespace) -> MMDiTArgs:
    return MMDiTArgs(num_layers=ns.layers, num_attention_heads=ns.heads, attention_head_dim=ns.head_dim,
                     joint_attention_dim=ns.joint_dim, axes_dims_rope=rope_axes(ns.head_dim))


def default_out(ns: argparse.Namespace) -> Path:
    device = "cpu" if ns.device == "cpu" else re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower())
    return RESULTS / f"{'slice' if ns.slice else 'recompute'}_{device.strip('_')}.json"


def measure(ns: argparse.Namespace, args: MMDiTArgs, shape: BatchShape):
    """Memory (one step each) and step times (round-robin) of every policy on one model."""
    # compiled as the trainer's with parallel.compile=true; each policy is applied below, in turn
    parallel = ParallelConfig(layers=ns.linear_layers, attention=ns.attention, compile=ns.compile)
    model = build_model(args, ns.device, ns.dtype, parallel, seed=ns.seed).model
    batch = make_batch(args, shape, ns.device, DTYPES[ns.dtype], seed=ns.seed, text_valid=ns.text_valid)

    apply_recompute(model, ns.policies[0], ns.every)  # warm-up: kernels, caches, compile, .grad
    for _ in range(ns.warmup):
        train_step(model, batch)
    memory = {}
    for policy in ns.policies:  # also each further policy's warm-up step (and compile)
        apply_recompute(model, policy, ns.every)
        memory[policy] = measure_memory(model, batch, ns.device)

    def timed(policy: str) -> Callable[[], StepTime]:
        def step() -> StepTime:
            apply_recompute(model, policy, ns.every)
            return time_step(model, batch, ns.device)
        return step

    times = timed_rounds({policy: timed(policy) for policy in ns.policies}, ns.repeats)
    linear_class = type(model.transformer_blocks[0].attn.to_qkv).__name__
    return memory, times, linear_class


def run(ns: argparse.Namespace) -> dict:
    on_cpu = ns.device == "cpu"
    if on_cpu:
        torch.set_num_threads(ns.threads)
    args = model_args(ns)
    shape = BatchShape(ns.batch, ns.height or ns.resolution, ns.width or ns.resolution, ns.text_tokens)
    memory, times, linear_class = measure(ns, args, shape)
    flops = step_flops(args, shape.batch, shape.image_tokens, shape.text_tokens)
    peak = ns.peak_tflops * 1e12 if ns.peak_tflops else (None if on_cpu else peak_flops(torch.cuda.get_device_name()))

    policies = {}
    for policy in ns.policies:
        t = min(x.wall_s for x in times[policy])
        extra = recompute_extra_flops(args, shape.batch, shape.image_tokens, shape.text_tokens,
                                      policy=policy, every=ns.every)
        policies[policy] = {
            "peak_activation_bytes": memory[policy].peak_bytes,
            "saved_activation_bytes": memory[policy].saved_bytes,
            "step_time_s": t,
            "step_time_median_s": median([x.wall_s for x in times[policy]]),
            "step_times_s": [x.wall_s for x in times[policy]],
            "step_cpu_time_s": min(x.cpu_s for x in times[policy]) if on_cpu else None,
            "model_tflops_per_s": flops / t / 1e12,
            "hardware_tflops_per_s": (flops + extra) / t / 1e12,
            "mfu": mfu(flops, t, 1, peak) if peak else None,
        }
    result = {
        "bench": "slice" if ns.slice else "recompute",
        **environment(ns.device),
        "dtype": ns.dtype,
        "cpu_threads": torch.get_num_threads() if on_cpu else None,
        "compile": ns.compile,
        "linear_layers": linear_class,
        "attention": ns.attention,
        "text_valid": ns.text_valid,
        "model": args_dict(args),
        "params": model_params(args),
        "batch": {"batch_size": shape.batch, "height_px": shape.height_px, "width_px": shape.width_px,
                  "image_tokens": shape.image_tokens, "text_tokens": shape.text_tokens},
        "model_flops_per_step": flops,
        "peak_flops_per_device": peak,
        "method": {
            "memory": memory[ns.policies[0]].method,
            "time": (f"step_time_s is the minimum of {ns.repeats} forward+loss+backward steps (no "
                     "optimizer) per policy, taken round-robin over the policies after "
                     f"{ns.warmup} warm-up step(s) and the memory step of each policy; CUDA is "
                     "synchronized before and after each step. Interference from other work on a "
                     "shared machine only adds time, so the minimum estimates the step's own cost; "
                     "the median is reported beside it. step_cpu_time_s (CPU only): minimum "
                     "process CPU time of a step; with --threads 1 the compute cost alone, "
                     "whatever else the machine runs"),
            "flops": "model/flops.py step_flops: model FLOPs, recompute not counted (MFU); "
                     "hardware_tflops_per_s adds recompute_extra_flops",
        },
        "policies": policies,
    }
    if "none" in policies:
        result["relative_to_none"] = {policy: relative(r, policies["none"]) for policy, r in policies.items()}
        if "full" in policies:
            full = result["relative_to_none"]["full"]
            result["target"] = {
                "full_peak_activation_max": TARGET_PEAK_RATIO, "full_step_time_max": TARGET_TIME_RATIO,
                "met": full["peak_activation"] <= TARGET_PEAK_RATIO and full["step_time"] <= TARGET_TIME_RATIO,
            }
    return result


def relative(r: dict, base: dict) -> dict:
    out = {"peak_activation": r["peak_activation_bytes"] / base["peak_activation_bytes"],
           "saved_activation": r["saved_activation_bytes"] / base["saved_activation_bytes"],
           "step_time": r["step_time_s"] / base["step_time_s"]}
    if base["step_cpu_time_s"]:
        out["step_cpu_time"] = r["step_cpu_time_s"] / base["step_cpu_time_s"]
    return out


def summary(result: dict) -> str:
    lines = [f"{result['bench']} on {result['device']} ({result['dtype']}): "
             f"{result['params'] / 1e6:.1f}M params, batch {result['batch']}"]
    rel = result.get("relative_to_none", {})
    for policy, r in result["policies"].items():
        mfu_text = f"  MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        rel_text = (f"  ({rel[policy]['peak_activation']:.2f}x memory, {rel[policy]['step_time']:.2f}x time)"
                    if policy in rel else "")
        lines.append(f"  {policy:<10} peak act {r['peak_activation_bytes'] / 2**20:9.1f} MiB  "
                     f"step {r['step_time_s'] * 1e3:9.1f} ms  {r['model_tflops_per_s']:8.2f} TFLOP/s"
                     f"{mfu_text}{rel_text}")
    if "target" in result:
        lines.append(f"  target full <= {TARGET_PEAK_RATIO:.0%} memory at <= {TARGET_TIME_RATIO}x time: "
                     f"{'met' if result['target']['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(ns)
    out = Path(ns.out) if ns.out else default_out(ns)
    write_json(result, out)
    print(summary(result), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
