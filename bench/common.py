"""Shared pieces of the benchmarks: build a model, make a batch, time a step, measure its memory.

Benchmarks are scripts (`python bench/<name>.py`), so this module is imported by its plain name.
Every measurement here is of one training step without the optimizer: forward, loss, backward.
"""

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import ParallelConfig
from mmdit.model.init import ZERO_INIT
from mmdit.model.mmdit import MMDiT, pack_latents, packed_shape
from mmdit.parallel.parallelize import Parallelized, parallelize
from mmdit.parallel.state import init_parallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rope_axes(head_dim: int) -> list[int]:
    """Frame/row/col split of the head dim in Qwen-Image's proportion (16, 56, 56 of 128)."""
    side = (head_dim - max(2, head_dim // 8)) // 4 * 2  # even, as MSRoPE rotates pairs
    return [head_dim - 2 * side, side, side]


def build_model(args: MMDiTArgs, device: str, dtype: str, parallel: ParallelConfig | None = None,
                seed: int = 0) -> Parallelized:
    """The real model (this rank's shard at TP=parallel.tp), built by `parallelize` as the trainer's
    is (`dtype` fp32 | bf16: parameters and compute, no optimizer), with real weights:
    init_weights, then the zero-initialized AdaLN modulation and output head drawn small random,
    so no matmul multiplies zeros (zeros draw less power on a GPU and would flatter its clocks)
    and every gradient is non-trivial. The weights are the same at every TP size."""
    parallel = parallel or ParallelConfig()
    init_parallel(parallel.tp, backend="gloo" if parallel.tp == 1 else None)  # TP=1: no collectives, no GPU setup
    built = parallelize(args, parallel, dtype=dtype, device=device, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if any(tag in name for tag in ZERO_INIT):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    built.model.train()
    return built


@dataclass(frozen=True)
class BatchShape:
    batch: int
    height_px: int
    width_px: int
    text_tokens: int

    def latent_hw(self, vae_scale: int = 8) -> tuple[int, int]:
        if self.height_px % (2 * vae_scale) or self.width_px % (2 * vae_scale):
            raise ValueError(f"image {self.height_px}x{self.width_px} must be a multiple of {2 * vae_scale} px")
        return self.height_px // vae_scale, self.width_px // vae_scale

    @property
    def image_tokens(self) -> int:
        h, w = self.latent_hw()
        return (h // 2) * (w // 2)


def make_batch(args: MMDiTArgs, shape: BatchShape, device: str, dtype: torch.dtype, seed: int = 0,
               text_valid: int | None = None) -> dict:
    """Random inputs of a text-to-image step. By default the text is unpadded and unmasked, as the
    trainer passes a micro-batch whose prompts fill it (SDPA may use its fused kernels);
    `text_valid` pads every sample after that many tokens except the first, which stays full (the
    trainer trims padding to the longest prompt), so the masked / packed kernels are measured."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape.latent_hw()
    tokens = pack_latents(torch.randn(shape.batch, args.latent_channels, h, w, generator=g))
    txt_mask = None
    if text_valid is not None and text_valid < shape.text_tokens:
        txt_mask = torch.ones(shape.batch, shape.text_tokens, dtype=torch.bool)
        txt_mask[1:, text_valid:] = False
        txt_mask = txt_mask.to(device)
    return {
        "img_tokens": tokens.to(device, dtype),
        "txt": torch.randn(shape.batch, shape.text_tokens, args.joint_attention_dim, generator=g).to(device, dtype),
        "txt_mask": txt_mask,
        "sigmas": torch.rand(shape.batch, generator=g).to(device),
        "image_shapes": [packed_shape(h, w)],
        "target": torch.randn(tokens.shape, generator=g).to(device, torch.float32),
    }


def forward_loss(model: MMDiT, batch: dict) -> torch.Tensor:
    out = model(batch["img_tokens"], batch["txt"], batch["txt_mask"], batch["sigmas"], batch["image_shapes"])
    return F.mse_loss(out.float(), batch["target"])


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model: MMDiT, batch: dict) -> None:
    """Forward + backward; gradients accumulate into the existing .grad tensors (zeroed in place),
    so a step allocates no gradient storage after the first and memory numbers are activations."""
    model.zero_grad(set_to_none=False)
    forward_loss(model, batch).backward()


@dataclass(frozen=True)
class StepTime:
    wall_s: float
    cpu_s: float
    """CPU time of this process (all threads) during the step: on a CPU device with one thread,
    the step's compute cost, unaffected by time the OS gave to other processes."""


def time_step(model: MMDiT, batch: dict, device: str) -> StepTime:
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    train_step(model, batch)
    synchronize(device)
    return StepTime(time.perf_counter() - wall, time.process_time() - cpu)


@dataclass
class StepMemory:
    saved_bytes: int
    """Allocated at the end of forward over the step's start: tensors saved for backward."""
    peak_bytes: int
    """Peak allocated during forward + backward over the step's start: what recompute reduces."""
    method: str


CPU_MEMORY_METHOD = (
    "CPU: torch.profiler(profile_memory=True) records every allocation and free of the CPU "
    "allocator (kernel-internal temporaries too) as signed byte counts; their running sum in time "
    "order is memory allocated since the step began, and its maximum is the step's peak. Saved = "
    "the running sum when backward starts (a record_function mark). Parameters, gradients (kept "
    "from a warm-up step, zeroed in place) and inputs exist before the step, so both numbers are "
    "activations and temporaries only.")
CUDA_MEMORY_METHOD = (
    "CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus "
    "memory_allocated() at the step's start; saved = memory_allocated() after forward minus the "
    "start. Parameters, gradients (kept from a warm-up step, zeroed in place) and inputs exist "
    "before the step, so both numbers are activations and temporaries only.")


def measure_memory(model: MMDiT, batch: dict, device: str) -> StepMemory:
    """Activation memory of one step; call after a warm-up step so that .grad exists."""
    model.zero_grad(set_to_none=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = forward_loss(model, batch)
        torch.cuda.synchronize()
        saved = torch.cuda.memory_allocated() - start
        loss.backward()
        del loss
        torch.cuda.synchronize()
        return StepMemory(saved, torch.cuda.max_memory_allocated() - start, CUDA_MEMORY_METHOD)
    return _cpu_step_memory(model, batch)


def _cpu_step_memory(model: MMDiT, batch: dict) -> StepMemory:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward_loss(model, batch)
        with record_function("mmdit_bench_backward"):
            loss.backward()
        del loss
    events = prof.profiler.kineto_results.events()
    backward_start = min(e.start_ns() for e in events if e.name() == "mmdit_bench_backward")
    allocations = sorted((e.start_ns(), e.nbytes()) for e in events
                         if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    if not allocations:
        raise RuntimeError("the profiler recorded no CPU allocations; cannot measure memory")
    running = peak = 0
    saved = None
    for start_ns, nbytes in allocations:
        if saved is None and start_ns >= backward_start:
            saved = running
        running += nbytes
        peak = max(peak, running)
    return StepMemory(saved if saved is not None else running, peak, CPU_MEMORY_METHOD)


def timed_rounds(steps: dict[str, Callable[[], StepTime]], repeats: int) -> dict[str, list[StepTime]]:
    """Run each named step `repeats` times, round-robin, so slow drift of a shared machine (other
    jobs, clocks) spreads over all variants instead of biasing whichever ran last."""
    times: dict[str, list[StepTime]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_results(results: dict, path: Path, started: float, reproduce: str) -> None:
    """A multi-process benchmark's JSON: its figures, the machine they ran on (load included, as
    absolute figures of a shared machine depend on it), the wall time and the command."""
    import os

    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform(), "load_avg_1m_at_end": os.getloadavg()[0]}
    results["wall_s"] = time.time() - started
    results["reproduce"] = reproduce
    write_json(results, path)
    print(f"wrote {path} in {results['wall_s']:.0f}s")


def args_dict(args: MMDiTArgs) -> dict:
    return {**asdict(args), "hidden_size": args.hidden_size, "mlp_hidden_size": args.mlp_hidden_size}
