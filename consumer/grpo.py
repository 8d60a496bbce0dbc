"""The GRPO update of Flow-GRPO (Qwen-Image report Eqs. 4-5 and 8): advantages and the loss.

A rollout (model/flow_sde.py) samples G images per prompt with the exploration SDE and records
every transition x_t -> x_t' with its log-probability under the policy that sampled it
(`old_log_prob`). Each image gets a reward r; its advantage is normalized within its prompt's
group,

    A = (r - mean(r of the group)) / std(r of the group),

(population std) so only the ranking inside a group matters; a group whose rewards are all equal
teaches nothing and gets A = 0 (never 0 / 0). Every transition of an image carries that image's
advantage. The update takes the transitions' log-probabilities under the current policy and
minimizes the PPO-style clipped objective plus a KL penalty to the frozen reference,

    ratio = exp(log_prob - old_log_prob)
    loss  = mean( max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)) ) + kl_beta * mean(KL)

where KL is the closed-form per-step KL between the policy's and the reference's transition
Gaussians (`flow_sde.sde_step_kl`). On the first update after a rollout the policy is the one that
sampled, so every ratio is exactly 1 and the loss is -mean(A) + kl_beta * mean(KL).

Figures (detached scalars, as the objective slot records them): the clip fraction (transitions
with |ratio - 1| > clip_range), the approximate KL to the sampling policy 0.5 * mean((log_prob -
old_log_prob)^2), the KL to the reference, the ratio's mean, and, from `reward_figures`, the
rewards' mean and std and the fraction of groups that taught nothing.

This module is the mathematics only: consumer/grpo_objective.py rolls out on the TP group,
gathers the rewards and runs the update through the objective slot.
"""

from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-6
"""A group whose rewards' std is at most this is constant: its advantages are 0."""


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """rewards [P, G] (P prompts, G images each) -> advantages [P, G], float32: (r - mean) / std
    within each row (population std); 0 for a row with std <= eps. Each row sums to 0."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group >= 2], got {tuple(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite: drop a failed sample from its group before this")
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, correction=0)
    flat = std <= eps
    return torch.where(flat, torch.zeros_like(centred), centred / torch.where(flat, torch.ones_like(std), std))


def reward_figures(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> dict[str, torch.Tensor]:
    """rewards [P, G] -> their mean, their std over all images, the mean std within a group, and
    the fraction of groups whose rewards are equal (they get no advantage)."""
    r = rewards.detach().float()
    group_std = r.std(dim=1, correction=0)
    return {"reward_mean": r.mean(), "reward_std": r.std(correction=0), "reward_group_std": group_std.mean(),
            "flat_group_fraction": (group_std <= eps).float().mean()}


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped objective over recorded transitions, plus kl_beta * mean(kl).

    `log_prob` (with the policy's graph), `old_log_prob` (the rollout's) and `kl` (per transition,
    to the reference) share one shape, e.g. [N] or [B, T]; `advantages` broadcasts against it
    (each transition takes its image's advantage). Returns (scalar loss, figures)."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    if log_prob.shape != old_log_prob.shape:
        raise ValueError(f"log_prob {tuple(log_prob.shape)} and old_log_prob {tuple(old_log_prob.shape)} differ")
    if kl_beta and kl is None:
        raise ValueError("kl_beta > 0 needs the per-transition kl")
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float().expand_as(ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss
    figures = {
        "policy_loss": policy_loss.detach(),
        "clip_fraction": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "approx_kl": 0.5 * log_ratio.detach().square().mean(),
        "ratio_mean": ratio.detach().mean(),
    }
    if kl is not None:
        if kl.shape != log_prob.shape:
            raise ValueError(f"kl {tuple(kl.shape)} must be per transition, like log_prob {tuple(log_prob.shape)}")
        kl_mean = kl.float().mean()
        loss = loss + kl_beta * kl_mean
        figures["kl"] = kl_mean.detach()
    return loss, figures
