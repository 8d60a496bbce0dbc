"""GRPO helpers for tests, importable by spawned ranks (parallel/spawn.py pickles by name)."""

import torch
from model_workers import gathered_gradients

from mmdit.config.loader import load_config
from mmdit.model.mmdit import build_mmdit
from mmdit.model.sharding import load_full_state_dict
from mmdit.parallel.parallelize import resolve
from mmdit.parallel.state import init_parallel, tp_group

SMALL = ["train.objective=grpo", "train.grpo.reward=latent_target", "train.grpo.width=32", "train.grpo.height=48",
         "train.grpo.sde_steps=3", "train.grpo.group_size=3", "train.grpo.prompts_per_step=2",
         "train.grpo.cfg_scale=2.5", "train.grpo.kl_beta=0.5", "train.random_text_len=7"]


def grpo_step(rank: int, tp: int, policy_state: dict, reference_path: str) -> dict:
    """One GRPO rollout, loss and backward at this TP with true CFG: the policy from
    `policy_state`, the reference built by the objective's setup from `reference_path`. Returns
    the loss, the figures and every parameter's full gradient (gathered over the TP group)."""
    from mmdit.consumer.grpo_objective import GrpoObjective

    torch.set_num_threads(1)
    init_parallel(tp)
    cfg = load_config([f"parallel.tp={tp}", *SMALL, f"checkpoint.init_from={reference_path}"])
    plan = resolve(cfg.parallel, cfg.train.dtype, world_size=tp, device="cpu")
    model = build_mmdit(cfg.model, tp_group())
    load_full_state_dict(model, policy_state)
    objective = GrpoObjective.from_config(cfg, plan)
    objective.setup(None)
    loss, figures = objective.loss(model, {}, step=2, first_index=1)
    loss.backward()
    grads = gathered_gradients(model, tp)
    return {"loss": loss.detach(), "figures": {k: v.detach() for k, v in figures.items()}, "grads": grads}

