"""DPO helpers for tests, importable by spawned ranks (parallel/spawn.py pickles by name)."""

import torch

from mmdit.config.loader import load_config
from mmdit.model.mmdit import build_mmdit
from mmdit.model.sharding import load_full_state_dict, partition_dims, unshard
from mmdit.parallel.parallelize import resolve
from mmdit.parallel.state import init_parallel, tp_group


def pair_batch(args, seed: int = 4, b: int = 2, h: int = 6, w: int = 10, text: int = 9) -> dict:
    """Preference pairs as the data service hands them: the preferred image's latents in
    `latents`, the rejected one's in `cond_latents` (one bucket), the prompt once, one padded.
    Odd token counts (3 x 5 image, 9 text tokens) that no TP size > 1 divides."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, text, dtype=torch.bool)
    mask[0, 5:] = False
    return {"latents": torch.randn(b, args.latent_channels, h, w, generator=g),
            "cond_latents": torch.randn(b, args.latent_channels, h, w, generator=g),
            "prompt_embeds": torch.randn(b, text, args.joint_attention_dim, generator=g) * mask[..., None],
            "prompt_mask": mask, "task": ["pair"] * b}


def dpo_step(rank: int, tp: int, policy_state: dict, reference_path: str, beta: float,
             sequence_parallel_runs: tuple = (False,)) -> list[dict]:
    """One DPO loss and backward per entry of `sequence_parallel_runs`: the policy from
    `policy_state`, the reference built by the objective's setup (parallelize at this TP) from the
    checkpoint at `reference_path`. Returns the loss, the figures and every parameter's full
    gradient (a sharded one gathered over the TP group)."""
    from mmdit.consumer.dpo import DpoObjective

    init_parallel(tp)
    out = []
    for sp in sequence_parallel_runs:
        cfg = load_config([f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sp).lower()}",
                           "train.objective=dpo", f"train.dpo.beta={beta}", f"checkpoint.init_from={reference_path}"])
        plan = resolve(cfg.parallel, cfg.train.dtype, world_size=tp, device="cpu")
        model = build_mmdit(cfg.model, tp_group(), sequence_parallel=plan.sequence_parallel)
        load_full_state_dict(model, policy_state)
        objective = DpoObjective.from_config(cfg, plan)
        objective.setup(None)
        loss, figures = objective.loss(model, pair_batch(cfg.model), step=3, first_index=1)
        loss.backward()
        dims, grads = partition_dims(model), {}
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            parts = [torch.empty_like(p.grad) for _ in range(tp)]
            torch.distributed.all_gather(parts, p.grad.contiguous(), group=tp_group())
            grads[name] = p.grad if dims[name] is None else unshard(parts, dims[name])
        out.append({"loss": loss.detach(), "figures": {k: v.detach() for k, v in figures.items()}, "grads": grads,
                    "sequence_parallel": plan.sequence_parallel})
    return out
