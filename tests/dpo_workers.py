"""DPO helpers for tests, importable by spawned ranks (parallel/spawn.py pickles by name)."""

import torch
from model_workers import gathered_gradients

from mmdit.config.loader import load_config
from mmdit.model.mmdit import build_mmdit
from mmdit.model.sharding import load_full_state_dict
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
        grads = gathered_gradients(model, tp)
        out.append({"loss": loss.detach(), "figures": {k: v.detach() for k, v in figures.items()}, "grads": grads,
                    "sequence_parallel": plan.sequence_parallel})
    return out


def preference_pairs(args, n: int, seed: int, side: int = 8, text: int = 6) -> dict:
    """`n` pairs with an objective preference: the preferred latents are a random image plus a
    fixed pattern `d`, the rejected ones the same image minus it (`d` is drawn from seed 0, so
    training and held-out pairs share the property, not the images)."""
    d = torch.randn(args.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, args.latent_channels, side, side, generator=g)
    return {"latents": base + d, "cond_latents": base - d,
            "prompt_embeds": torch.randn(n, text, args.joint_attention_dim, generator=g),
            "prompt_mask": torch.ones(n, text, dtype=torch.bool), "task": ["pair"] * n, "direction": d}


def dpo_learning(steps: int, beta: float, lr: float, batch: int = 8, held_out: int = 64, sample: int = 16) -> dict:
    """Train the tiny MMDiT with DPO (the trainer's micro_step and optimizer step, TP=1) on
    preference_pairs; returns the held-out preference accuracy and reward margin before and after,
    and how far samples drawn from noise lean towards the preferred pattern (mean cosine with `d`
    of the generated latents) under the reference and the trained policy."""
    from mmdit.consumer.dpo import DpoObjective
    from mmdit.consumer.trainer import micro_step
    from mmdit.model.flow import euler_sample
    from mmdit.model.mmdit import pack_latents, packed_shape, unpack_latents
    from mmdit.parallel.parallelize import parallelize

    cfg = load_config(["train.objective=dpo", f"train.dpo.beta={beta}", f"optimizer.lr={lr}", "optimizer.warmup_steps=0",
                       "optimizer.lr_schedule=constant", "seed=3"])
    built = parallelize(cfg.model, cfg.parallel, dtype=cfg.train.dtype, optimizer=cfg.optimizer, seed=cfg.seed,
                        device="cpu")
    objective = DpoObjective.from_config(cfg, built.plan)
    objective.setup(built)
    test = preference_pairs(cfg.model, held_out, seed=10_000)

    def held_out_figures() -> dict:
        with torch.no_grad():
            _, figures = objective.loss(built.model, test, step=10_000, first_index=0)
        return {k: float(v) for k, v in figures.items()}

    def lean(model) -> float:
        """Mean cosine between generated latents and the preferred pattern (positive: towards it)."""
        g = torch.Generator().manual_seed(7)
        noise = pack_latents(torch.randn(sample, cfg.model.latent_channels, 8, 8, generator=g))
        txt = test["prompt_embeds"][:sample]
        with torch.no_grad():
            x = euler_sample(lambda x, s: model(x, txt, None, s, [packed_shape(8, 8)]), noise, 8, noise.shape[1])
        x = unpack_latents(x, 8, 8).flatten(1)
        return float(torch.nn.functional.cosine_similarity(x, test["direction"].flatten()[None], dim=1).mean())

    before = held_out_figures()
    lean_reference = lean(objective.reference)
    losses = []
    for step in range(steps):
        built.backend.set_lr(lr)
        built.backend.zero_grad()
        loss, _ = micro_step(built.backend, objective, preference_pairs(cfg.model, batch, seed=step), step, 0)
        built.backend.step()
        losses.append(float(loss))
    return {"before": before, "after": held_out_figures(), "losses": losses, "lean_reference": lean_reference,
            "lean_policy": lean(built.model)}
