"""LoRA vs full training on the same model: step time and peak memory, as ratios.

    python bench/lora.py                                  # CPU, fp32, torch backend (2 cores: ~2 min)
    python bench/lora.py --device cuda --dtype bf16       # GPU: megatron DDP + DistributedOptimizer

Both runs build their model as the trainer does (`parallelize`, with the optimizer of
`parallel.backend`: torch DDP + ZeRO AdamW on CPU, megatron's distributed optimizer on GPU), from
the same weights, and take whole training steps: forward, loss, backward, optimizer step. LoRA is
`train.lora.rank` 64 on the default targets (attention projections and MLPs of both streams).

Memory is counted by kind after a warm-up step, so the figures are the same on every run:
parameters (a LoRA base frozen in the compute dtype, plus adapters), gradients, optimizer state
(Adam moments; megatron: fp32 main weights too), and the activations' peak over a forward +
backward (bench/common.py `measure_memory`: the CUDA allocator's peak, or the CPU profiler's
allocations). On a GPU the allocator's peak over a whole step is reported as well. Step time is
the median of `--repeats` steps taken alternately, wall and (CPU device, one thread by default)
the process's CPU time, which a loaded shared machine does not inflate.
"""

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch
from common import (  # bench/ is a scripts folder: run as `python bench/lora.py`
    DTYPES,
    BatchShape,
    args_dict,
    environment,
    forward_loss,
    make_batch,
    measure_memory,
    rope_axes,
    write_json,
)

from mmdit.config.lora import LoraConfig
from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import ParallelConfig
from mmdit.config.train import OptimizerConfig
from mmdit.model.init import ZERO_INIT
from mmdit.parallel.parallelize import parallelize
from mmdit.parallel.state import init_parallel

RESULTS = Path(__file__).resolve().parent / "results"


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_tensors(backend):
    """Every tensor of the optimizer's state (its own shard: ZeRO / the distributed optimizer)."""
    if backend.name.startswith("torch"):
        return [v for state in backend.optimizer.optim.state.values() for v in state.values()]
    found = []
    for opt in getattr(backend.optimizer, "chained_optimizers", [backend.optimizer]):
        inner = getattr(opt, "optimizer", opt)
        found += [v for state in inner.state.values() for v in state.values()]
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            found += list(group)
    return found


class Run:
    def __init__(self, args: MMDiTArgs, device: str, dtype: str, lora: LoraConfig | None, seed: int = 0):
        self.built = parallelize(args, ParallelConfig(), dtype=dtype, device=device, seed=seed,
                                 optimizer=OptimizerConfig(lr=1e-4), lora=lora)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # the zero-initialized modulation drawn small, so every gradient is non-trivial
            for name, p in self.built.model.named_parameters():
                if any(tag in name for tag in ZERO_INIT):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.device = device

    def step(self, batch: dict) -> tuple[float, float]:
        """(wall, CPU) seconds of one training step."""
        backend = self.built.backend
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        backend.zero_grad()
        forward_loss(backend.model, batch).backward()
        backend.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    def memory(self, batch: dict) -> dict:
        model = self.built.model
        trained = [p for p in model.parameters() if p.requires_grad]
        params = tensor_bytes(model.parameters())
        grads = tensor_bytes(p.main_grad if hasattr(p, "main_grad") else p.grad for p in trained)
        optimizer = tensor_bytes(optimizer_tensors(self.built.backend))
        activations = measure_memory(model, batch, self.device)
        out = {"parameters_total": sum(p.numel() for p in model.parameters()),
               "parameters_trained": sum(p.numel() for p in trained),
               "parameter_bytes": params, "gradient_bytes": grads, "optimizer_bytes": optimizer,
               "activation_peak_bytes": activations.peak_bytes, "activation_method": activations.method}
        out["total_bytes"] = params + grads + optimizer + activations.peak_bytes
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.step(batch)
            out["cuda_step_peak_bytes"] = torch.cuda.max_memory_allocated()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU device)")
    parser.add_argument("--out", default=str(RESULTS / "lora.json"))
    opts = parser.parse_args()

    args = MMDiTArgs(num_layers=opts.layers, num_attention_heads=opts.heads, attention_head_dim=opts.head_dim,
                     joint_attention_dim=opts.heads * opts.head_dim, axes_dims_rope=rope_axes(opts.head_dim))
    if not opts.device.startswith("cuda"):
        torch.set_num_threads(opts.threads)  # CPU time per step: the compute cost, whatever the load
    init_parallel(1, backend="gloo" if not opts.device.startswith("cuda") else None)
    shape = BatchShape(opts.batch, opts.resolution, opts.resolution, opts.text_tokens)
    batch = make_batch(args, shape, opts.device, DTYPES[opts.dtype])
    configs = {"full": None, "lora": LoraConfig(rank=opts.rank)}
    results = {}
    for name, lora in configs.items():  # memory one model at a time, so that neither sees the other's
        run = Run(args, opts.device, opts.dtype, lora)
        run.step(batch)  # warm-up: gradients and optimizer state exist
        results[name] = run.memory(batch)
        del run
        gc.collect()
        if opts.device.startswith("cuda"):
            torch.cuda.empty_cache()
    runs = {name: Run(args, opts.device, opts.dtype, lora) for name, lora in configs.items()}
    times = {name: [] for name in runs}
    for run in runs.values():
        run.step(batch)
    for _ in range(opts.repeats):  # alternately: a shared machine's load falls on both alike
        for name, run in runs.items():
            times[name].append(run.step(batch))
    for name in runs:
        results[name]["step_wall_s"] = statistics.median(t[0] for t in times[name])
        results[name]["step_cpu_s"] = statistics.median(t[1] for t in times[name])
    full, lora = results["full"], results["lora"]
    ratios = {"total_memory": lora["total_bytes"] / full["total_bytes"],
              "step_time_cpu": lora["step_cpu_s"] / full["step_cpu_s"],
              "step_time_wall": lora["step_wall_s"] / full["step_wall_s"],
              "trained_parameters": lora["parameters_trained"] / full["parameters_trained"]}
    if "cuda_step_peak_bytes" in full:
        ratios["cuda_step_peak"] = lora["cuda_step_peak_bytes"] / full["cuda_step_peak_bytes"]
    result = {"benchmark": "lora", "rank": opts.rank, "model": args_dict(args), "dtype": opts.dtype,
              "batch": {"size": opts.batch, "resolution": opts.resolution, "text_tokens": opts.text_tokens},
              "lora_over_full": ratios, "full": full, "lora": lora, "environment": environment(opts.device),
              "load_avg_1m": os.getloadavg()[0]}
    write_json(result, opts.out)
    print(f"LoRA rank {opts.rank} / full: memory {ratios['total_memory']:.3f}, step time {ratios['step_time_cpu']:.3f} "
          f"(CPU) {ratios['step_time_wall']:.3f} (wall), trained parameters {ratios['trained_parameters']:.4f} -> {opts.out}")


if __name__ == "__main__":
    main()
