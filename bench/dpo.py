"""Diffusion-DPO's cost: a DPO training step against a plain flow-matching step on the same model.

    python bench/dpo.py                                  # CPU, fp32, one thread, a small model (~30 s)
    python bench/dpo.py --device cuda --dtype bf16       # on a GPU

Both steps are the trainer's: the objective's loss (consumer/objectives.py, consumer/dpo.py), the
backward and the optimizer step (parallelize's backend), on the same weights and data shapes. A
DPO step over B pairs runs the policy forward and backward on 2B images (preferred and rejected
side by side) and the frozen reference forward on 2B images; it is compared with a flow step on
B images (the same number of prompts) and on 2B images (the same number of images). Step times
are medians of `--repeats` steps taken round-robin; memory is the step's peak over what exists
before it (CPU: the profiler's allocation records, as bench/common.py measures; CUDA:
max_memory_allocated), plus the reference model's weights, which DPO holds all run long.

The result also gives the reference's weight memory at the released 20B model per TP size:
bf16 weights, the TP-split parameters divided by TP, the replicated ones (norms, embeddings that
every rank holds) whole, counted from the model built on the meta device.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from common import environment, median, write_json

from mmdit.config.loader import load_config
from mmdit.config.model import MMDiTArgs

RESULTS = Path(__file__).resolve().parent / "results"


def step_memory(step, device: str) -> int:
    """Peak bytes allocated during `step()` over its start."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    running = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU"):
        running += nbytes
        peak = max(peak, running)
    return peak


def batches(args: MMDiTArgs, pairs: int, side_px: int, text: int, seed: int = 0) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    h = side_px // 8

    def images(n):
        return torch.randn(n, args.latent_channels, h, h, generator=g)

    def prompts(n):
        return {"prompt_embeds": torch.randn(n, text, args.joint_attention_dim, generator=g),
                "prompt_mask": torch.ones(n, text, dtype=torch.bool)}

    return {"flow_same_prompts": {"latents": images(pairs), **prompts(pairs), "task": ["t2i"] * pairs},
            "flow_same_images": {"latents": images(2 * pairs), **prompts(2 * pairs), "task": ["t2i"] * (2 * pairs)},
            "dpo": {"latents": images(pairs), "cond_latents": images(pairs), **prompts(pairs), "task": ["pair"] * pairs}}


def reference_memory_20b() -> dict:
    """bf16 weight bytes of the released model's reference per TP rank, by TP size."""
    from mmdit.model.mmdit import build_mmdit
    from mmdit.model.sharding import partition_dims
    from mmdit.parallel.state import tp_group

    model = build_mmdit(MMDiTArgs(), tp_group(), device="meta")
    dims = partition_dims(model)
    split = sum(p.numel() for n, p in model.named_parameters() if dims[n] is not None)
    whole = sum(p.numel() for n, p in model.named_parameters() if dims[n] is None)
    return {"params": split + whole, "tp_split_params": split, "replicated_params": whole,
            "bf16_gib_per_rank": {str(tp): round(2 * (split / tp + whole) / 2**30, 2) for tp in (1, 2, 4, 8)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--joint-dim", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "dpo.json"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU device; one makes CPU time the cost)")
    a = parser.parse_args()
    started = time.time()
    if not a.device.startswith("cuda"):
        torch.set_num_threads(a.threads)
    side = (a.head_dim - max(2, a.head_dim // 8)) // 4 * 2
    model_keys = [f"model.num_layers={a.layers}", f"model.num_attention_heads={a.heads}",
                  f"model.attention_head_dim={a.head_dim}", f"model.joint_attention_dim={a.joint_dim}",
                  f"model.axes_dims_rope=[{a.head_dim - 2 * side},{side},{side}]"]
    cfg = load_config([*model_keys, "train.objective=dpo", "train.dpo.beta=500", f"train.dtype={a.dtype}",
                       "optimizer.warmup_steps=0", "optimizer.lr_schedule=constant"])
    from mmdit.consumer.dpo import DpoObjective
    from mmdit.consumer.objectives import FlowObjective
    from mmdit.parallel.parallelize import parallelize

    built = parallelize(cfg.model, cfg.parallel, dtype=cfg.train.dtype, optimizer=cfg.optimizer, seed=cfg.seed,
                        device=a.device)
    flow, dpo = FlowObjective.from_config(cfg, built.plan), DpoObjective.from_config(cfg, built.plan)
    dpo.setup(built)
    reference_bytes = sum(p.numel() * p.element_size() for p in dpo.reference.parameters())
    data = batches(cfg.model, a.pairs, a.resolution, a.text)
    objectives = {"flow_same_prompts": flow, "flow_same_images": flow, "dpo": dpo}

    def step(name: str) -> tuple[float, float]:
        """(wall, CPU) seconds of one step; on a CPU device, the process's CPU time is the step's
        cost whatever else the machine runs, so the ratios use it there."""
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t, cpu = time.perf_counter(), time.process_time()
        built.backend.zero_grad()
        loss, _ = objectives[name].loss(built.backend.model, data[name], 0, 0)
        loss.backward()
        built.backend.step()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - cpu

    for name in objectives:  # warm-up: optimizer state and gradients exist before anything is measured
        step(name)
    memory = {name: step_memory(lambda n=name: step(n), a.device) for name in objectives}
    times = {name: [] for name in objectives}
    for _ in range(a.repeats):
        for name in objectives:
            times[name].append(step(name))
    wall = {name: median([w for w, _ in t]) for name, t in times.items()}
    cpu = {name: median([c for _, c in t]) for name, t in times.items()}
    seconds = wall if a.device.startswith("cuda") else cpu
    result = {
        "what": "one training step (objective loss, backward, optimizer step): DPO over B pairs vs flow matching "
                "over B images (same prompts) and 2B images (same images)",
        "model": {"layers": a.layers, "heads": a.heads, "head_dim": a.head_dim, "joint_dim": a.joint_dim,
                  "params": sum(p.numel() for p in built.model.parameters())},
        "batch": {"pairs": a.pairs, "resolution": a.resolution, "text_tokens": a.text},
        "dtype": str(built.plan.compute_dtype).removeprefix("torch."), "repeats": a.repeats,
        "step_s": seconds,
        "step_s_measure": "wall" if a.device.startswith("cuda") else "CPU time of the process (a shared machine's "
                          "load leaves it alone)",
        "step_wall_s": wall,
        "time_ratio": {"dpo_vs_flow_same_prompts": seconds["dpo"] / seconds["flow_same_prompts"],
                       "dpo_vs_flow_same_images": seconds["dpo"] / seconds["flow_same_images"]},
        "step_peak_bytes": memory,
        "reference_weight_bytes": reference_bytes,
        "memory_ratio": {"dpo_vs_flow_same_prompts": (memory["dpo"] + reference_bytes) / memory["flow_same_prompts"],
                         "dpo_vs_flow_same_images": (memory["dpo"] + reference_bytes) / memory["flow_same_images"]},
        "memory_note": "step_peak_bytes: the step's peak over its start (activations, temporaries); the ratios add "
                       "the reference's weights, held by DPO all run long, to the DPO step's peak",
        "reference_20b": reference_memory_20b(),
        "reference_offload": "not measured: the reference stays on the device (an offloaded reference would "
                             "move its 20B/TP bf16 weights per step)",
        "environment": environment(a.device),
        "wall_s": round(time.time() - started, 1),
    }
    write_json(result, a.out)
    print({k: result[k] for k in ("step_s", "time_ratio", "memory_ratio")}, file=sys.stderr)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
