"""What one training step of a small model really allocates on the CPU, per rank: the measurement
tests/test_memory.py holds model/memory.py's prediction against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_activation_bytes(model, batch: dict, repeats: int = 3) -> tuple[int, int]:
    """(allocated at the end of forward, peak during forward + backward) over the step's start,
    each the least of `repeats` steps.

    The profiler records every allocation and free of the CPU allocator as signed byte counts;
    their running sum in time order is what the step holds. Parameters, gradients (allocated by an
    earlier step and zeroed in place) and inputs exist before, so both are activations. A loaded
    machine can only add to a step's count (a collective's buffer freed late, by another thread),
    never take from it, so the least of a few steps is the step's own.
    """
    counts = [_one_step_activation_bytes(model, batch) for _ in range(repeats)]
    return min(saved for saved, _ in counts), min(peak for _, peak in counts)


def _one_step_activation_bytes(model, batch: dict) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile, record_function

    model.zero_grad(set_to_none=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = _loss(model, batch)
        with record_function("memory_test_backward"):
            loss.backward()
        del loss
    events = prof.profiler.kineto_results.events()
    backward_start = min(e.start_ns() for e in events if e.name() == "memory_test_backward")
    running = peak = 0
    saved = None
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if saved is None and start >= backward_start:
            saved = running
        running += nbytes
        peak = max(peak, running)
    assert saved is not None and peak > 0, "the profiler recorded no allocations"
    return saved, peak


def _loss(model, batch: dict) -> torch.Tensor:
    out = model(batch["img"], batch["txt"], None, batch["sigmas"], batch["image_shapes"])
    return F.mse_loss(out.float(), batch["target"])


def make_batch(args, batch: int, side_px: int, text_tokens: int, dtype: torch.dtype) -> dict:
    from mmdit.model.mmdit import pack_latents, packed_shape

    g = torch.Generator().manual_seed(0)
    h = w = side_px // 8
    img = pack_latents(torch.randn(batch, args.latent_channels, h, w, generator=g))
    return {"img": img.to(dtype), "txt": torch.randn(batch, text_tokens, args.joint_attention_dim, generator=g).to(dtype),
            "sigmas": torch.rand(batch, generator=g), "image_shapes": [packed_shape(h, w)],
            "target": torch.randn(img.shape, generator=g)}


def measure_policies(rank: int, args, tp: int, sequence_parallel: bool, dtype: str, policies: list[str],
                     batch: int, side_px: int, text_tokens: int) -> dict:
    """This rank's (saved, peak) activation bytes per recompute policy, and its parameter count.
    Runs in this process at tp=1, as a spawned rank (parallel/spawn.py) at tp > 1."""
    return _measure(tp, sequence_parallel, args, dtype, policies, batch, side_px, text_tokens)


def measure_with_and_without_sp(rank: int, args, tp: int, batch: int, side_px: int, text_tokens: int) -> dict:
    """A spawned TP rank: {sequence_parallel: measure_policies' result for policy none} in fp32."""
    return {sp: _measure(tp, sp, args, "fp32", ["none"], batch, side_px, text_tokens) for sp in (False, True)}


def _measure(tp: int, sequence_parallel: bool, args, dtype: str, policies: list[str], batch: int, side_px: int,
             text_tokens: int) -> dict:
    from mmdit.config.parallel import ParallelConfig
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.recompute import apply_recompute

    if tp > 1:
        from mmdit.parallel.state import init_parallel

        init_parallel(tp, backend="gloo")
    parallel = ParallelConfig(tp=tp, layers="local", attention="sdpa", sequence_parallel=sequence_parallel)
    model = parallelize(args, parallel, dtype=dtype, device="cpu", seed=0).model.train()
    inputs = make_batch(args, batch, side_px, text_tokens, DTYPES[dtype])
    result = {"params": sum(p.numel() for p in model.parameters())}
    _loss(model, inputs).backward()  # warm-up: .grad exists, so a step allocates activations only
    for policy in policies:
        apply_recompute(model, policy)
        result[policy] = step_activation_bytes(model, inputs)
    return result
