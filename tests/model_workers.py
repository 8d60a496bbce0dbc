"""Model helpers for tests, importable by spawned ranks (parallel/spawn.py pickles by name)."""

import torch

from mmdit.config.model import MMDiTArgs
from mmdit.launch.convert import verification_cases
from mmdit.model.mmdit import build_mmdit
from mmdit.model.sharding import diffusers_full_shapes, load_full_state_dict, partition_dims, unshard
from mmdit.parallel.compile import compile_blocks
from mmdit.parallel.recompute import apply_recompute
from mmdit.parallel.state import init_parallel, tp_group


def random_full_state_dict(args: MMDiTArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for every parameter (norm scales near 1), unlike init_weights' zeroed
    modulation, so that every parameter gets a non-trivial gradient."""
    init_parallel(1)
    shapes = diffusers_full_shapes(build_mmdit(args, tp_group(), device="meta"))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        state[name] = 1 + 0.1 * noise if len(shape) == 1 and "norm" in name else 0.08 * noise
    return state


def odd_lengths_case(args: MMDiTArgs) -> dict:
    """Streams no TP size > 1 divides: 5 x 7 image tokens and 11 text tokens, one prompt padded."""
    from mmdit.model.mmdit import pack_latents, packed_shape

    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 6:] = False
    return dict(img_tokens=pack_latents(torch.randn(2, args.latent_channels, 10, 14, generator=g)),
                txt=torch.randn(2, 11, args.joint_attention_dim, generator=g), txt_mask=mask,
                sigmas=torch.rand(2, generator=g), image_shapes=[packed_shape(10, 14)])


def forward_backward(rank: int, args: MMDiTArgs, tp: int, state: dict, recompute: str = "none",
                     case: str = "edit", compile: bool = False, sequence_parallel: bool = False,
                     attention: str = "sdpa") -> dict:
    """Output of one case and the full gradient of every parameter: a sharded one gathered, a
    replicated one as this rank holds it (so every rank's copy is checked)."""
    init_parallel(tp)
    model = build_mmdit(args, tp_group(), sequence_parallel=sequence_parallel, attention=attention)
    load_full_state_dict(model, state)
    apply_recompute(model, recompute, every=2)
    if compile:
        compile_blocks(model)
    inputs = odd_lengths_case(args) if case == "odd" else verification_cases(args, seed=1)[case]
    out = model(**inputs)
    (out.float().square().mean() + out.sum() * 1e-3).backward()
    return {"out": out.detach(), "grads": gathered_gradients(model, tp)}


def gathered_gradients(model, tp: int) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient: a sharded one gathered over the TP group, a replicated
    one as this rank holds it (so every rank's copy is checked)."""
    dims, grads = partition_dims(model), {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        parts = [torch.empty_like(p.grad) for _ in range(tp)]
        torch.distributed.all_gather(parts, p.grad.contiguous(), group=tp_group())
        grads[name] = p.grad if dims[name] is None else unshard(parts, dims[name])
    return grads


def forward_from_state(args: MMDiTArgs, state: dict) -> torch.Tensor:
    """The reference output of outputs_from_checkpoint, in this process at TP=1."""
    init_parallel(1)
    model = build_mmdit(args, tp_group())
    load_full_state_dict(model, state)
    with torch.no_grad():
        return model(**verification_cases(args, seed=2)["edit"])


def outputs_from_checkpoint(rank: int, path: str, tp: int) -> torch.Tensor:
    from mmdit.model.checkpoint import checkpoint_args, load_model

    init_parallel(tp)
    args = checkpoint_args(path)
    model = build_mmdit(args, tp_group())
    load_model(model, path)
    with torch.no_grad():
        return model(**verification_cases(args, seed=2)["edit"])


def save_sharded(rank: int, args: MMDiTArgs, state: dict, path: str, tp: int) -> None:
    from mmdit.model.checkpoint import save_model

    init_parallel(tp)
    model = build_mmdit(args, tp_group())
    load_full_state_dict(model, state)
    save_model(model, path, barrier=lambda: torch.distributed.barrier(group=tp_group()))
