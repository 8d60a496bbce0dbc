"""Flow-GRPO's mathematics: the exploration SDE's step, its log-probability and KL
(model/flow_sde.py), group advantages and the clipped loss (consumer/grpo.py), and a toy policy
that learns from them."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from mmdit.consumer.grpo import group_advantages, grpo_loss, reward_figures
from mmdit.model.flow import euler_sample, scheduler_sigmas
from mmdit.model.flow_sde import (
    sde_log_prob,
    sde_sample,
    sde_sigma,
    sde_step,
    sde_step_kl,
    sde_step_moments,
)


def _by_hand_moments(x, v, t, t_next, a, t_max=0.95):
    """The Euler-Maruyama transition of dx = [v + s^2/(2t)(x + (1-t)v)] dt + s dw, s = a sqrt(t/(1-t))."""
    tc = min(t, t_max)
    sigma = a * math.sqrt(tc / (1 - tc))
    dt = t_next - t
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, sigma * math.sqrt(-dt)


def test_sigma_schedule_is_clipped():
    t = torch.tensor([0.0, 0.5, 0.95, 1.0])
    got = sde_sigma(t, a=0.7, t_max=0.95)
    assert torch.allclose(got, 0.7 * torch.tensor([0.0, 1.0, math.sqrt(19), math.sqrt(19)]))
    assert torch.isfinite(got).all()


def test_step_moments_match_the_formula_and_become_euler_as_sigma_vanishes():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    for t, t_next in [(1.0, 0.8), (0.6, 0.45), (0.05, 0.0)]:
        mean, std = sde_step_moments(x, v, t, t_next, a=0.7)
        want_mean, want_std = _by_hand_moments(x, v, t, t_next, 0.7)
        assert torch.allclose(mean, want_mean, atol=1e-6) and math.isclose(float(std), want_std, rel_tol=1e-6)
        euler = x + (t_next - t) * v
        mean0, std0 = sde_step_moments(x, v, t, t_next, a=0.0)
        assert torch.allclose(mean0, euler, atol=1e-7) and float(std0) == 0.0
        small_mean, small_std = sde_step_moments(x, v, t, t_next, a=1e-4)  # the correction is O(a^2)
        assert (small_mean - euler).abs().max() < 1e-6 and float(small_std) < 1e-3
        assert (mean - euler).abs().max() > 1e-3  # a = 0.7 does change the step
    # drawn steps have those moments
    x1, v1 = torch.full((1, 200_000), 0.3), torch.full((1, 200_000), -0.5)
    draws, _ = sde_step(x1, v1, 0.7, 0.5, a=0.7, generator=g)
    want_mean, want_std = _by_hand_moments(0.3, -0.5, 0.7, 0.5, 0.7)
    assert abs(draws.mean().item() - want_mean) < 0.01 and abs(draws.std().item() / want_std - 1) < 0.01


def test_sde_sampler_equals_euler_sampler_as_sigma_vanishes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 8, generator=g) * 0.3

    def velocity(x, sigma):
        return x @ w + sigma.view(-1, 1, 1)

    noise = torch.randn(2, 6, 8, generator=g)
    ode = euler_sample(velocity, noise, 10, 256)
    traj = sde_sample(velocity, noise, 10, 256, a=1e-8, generator=g)
    assert traj.states.shape == (11, 2, 6, 8) and traj.log_probs.shape == (10, 2)
    assert traj.times == scheduler_sigmas(10, 256).tolist()
    assert (traj.sample - ode).abs().max() < 1e-6
    explored = sde_sample(velocity, noise, 10, 256, a=0.7, generator=g)
    assert (explored.sample - ode).abs().max() > 0.1


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_is_the_gaussian_density(reduce):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, 6, generator=g)
    x_next, log_prob = sde_step(x, v, 0.7, 0.55, a=0.9, generator=g, reduce=reduce)
    mean, std = _by_hand_moments(x, v, 0.7, 0.55, 0.9)
    dens = Normal(mean, std).log_prob(x_next)
    want = dens.mean(dim=(1, 2)) if reduce == "mean" else dens.sum(dim=(1, 2))
    assert torch.allclose(log_prob, want, atol=1e-5)
    assert torch.allclose(sde_log_prob(x, x_next, v, 0.7, 0.55, a=0.9, reduce=reduce), want, atol=1e-5)
    # per-sample times, as an update over recorded steps of different t takes them
    t, t_next = torch.tensor([0.9, 0.7, 0.4, 0.2]), torch.tensor([0.8, 0.55, 0.3, 0.0])
    got = sde_log_prob(x, x_next, v, t, t_next, a=0.9, reduce=reduce)
    for i in range(4):
        m, s = _by_hand_moments(x[i], v[i], t[i].item(), t_next[i].item(), 0.9)
        d = Normal(m, s).log_prob(x_next[i])
        assert math.isclose(got[i].item(), (d.mean() if reduce == "mean" else d.sum()).item(), rel_tol=1e-5)


def test_kl_has_the_closed_form_and_vanishes_for_equal_policies():
    g = torch.Generator().manual_seed(3)
    x, v, v_ref = (torch.randn(3, 4, 5, generator=g) for _ in range(3))
    t, t_next, a = 0.8, 0.6, 0.7
    mean_p, std = _by_hand_moments(x, v, t, t_next, a)
    mean_r, _ = _by_hand_moments(x, v_ref, t, t_next, a)
    by_hand = ((mean_p - mean_r) ** 2 / (2 * std**2)).sum(dim=(1, 2))
    torch_kl = kl_divergence(Normal(mean_p, std), Normal(mean_r, std)).sum(dim=(1, 2))
    got = sde_step_kl(v, v_ref, t, t_next, a=a, reduce="sum")
    assert torch.allclose(got, by_hand, rtol=1e-4) and torch.allclose(got, torch_kl, rtol=1e-4)
    assert torch.allclose(sde_step_kl(v, v_ref, t, t_next, a=a), by_hand / 20, rtol=1e-4)  # mean of 4 x 5
    assert (got > 0).all()
    assert torch.equal(sde_step_kl(v, v.clone(), t, t_next, a=a), torch.zeros(3))


def test_group_advantages():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 10.0, 2.0]])
    adv = group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv.sum(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5))
    assert torch.equal(adv[1], torch.zeros(3))
    assert torch.allclose(adv[2].std(correction=0), torch.tensor(1.0))
    figures = reward_figures(rewards)
    assert math.isclose(figures["reward_mean"].item(), 33 / 9, rel_tol=1e-6)
    assert math.isclose(figures["flat_group_fraction"].item(), 1 / 3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


def test_clipped_loss_equals_a_hand_computation():
    ratios = torch.tensor([0.5, 1.0, 1.5, 1.1])
    old = torch.tensor([-1.0, -2.0, 0.5, 3.0])
    log_prob = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    kl = torch.tensor([0.1, 0.0, 0.3, 0.2])
    loss, figures = grpo_loss(log_prob, old, adv, clip_range=0.2, kl=kl, kl_beta=0.5)
    # max(-A r, -A clip(r)): -0.5 (unclipped is larger), 1.0, -1.2 (clipped), 1.1
    assert math.isclose(loss.item(), (-0.5 + 1.0 - 1.2 + 1.1) / 4 + 0.5 * 0.15, rel_tol=1e-6)
    loss.backward()
    # d/dlogp (-A r) = -A r where unclipped is taken; 0 where the clip holds the ratio
    assert torch.allclose(log_prob.grad, torch.tensor([-0.5, 1.0, 0.0, 1.1]) / 4, atol=1e-6)
    assert figures["clip_fraction"].item() == 0.5
    assert math.isclose(figures["kl"].item(), 0.15, rel_tol=1e-6)
    assert math.isclose(figures["approx_kl"].item(), 0.5 * (ratios.log() ** 2).mean().item(), rel_tol=1e-5)


def test_grpo_updates_teach_a_toy_policy_its_target():
    """The policy is a velocity vector b (v(x, t) = b); the reward prefers samples near a target.
    Rollouts with the SDE, group advantages, the clipped loss with KL to the initial policy."""
    torch.manual_seed(0)
    dim, prompts, group, steps, seq_len, a = 4, 4, 8, 4, 256, 0.7
    target = torch.tensor([1.5, -1.0, 0.5, 2.0])
    b = torch.zeros(dim, requires_grad=True)
    b_ref = b.detach().clone()
    opt = torch.optim.Adam([b], lr=0.1)
    g = torch.Generator().manual_seed(10)

    def reward(x):  # [B, 1, dim] -> [B]
        return -(x[:, 0] - target).square().mean(dim=1)

    def rollout(generator, count, v):
        noise = torch.randn(count, 1, dim, generator=generator)
        return sde_sample(lambda x, s: v.expand_as(x), noise, steps, seq_len, a=a, generator=generator)

    def held_out_reward():
        return reward(rollout(torch.Generator().manual_seed(99), 512, b.detach()).sample).mean().item()

    before = held_out_reward()
    first_update, curve = True, []
    for _ in range(15):
        traj = rollout(g, prompts * group, b.detach())
        rewards = reward(traj.sample).view(prompts, group)
        curve.append(reward_figures(rewards)["reward_mean"].item())
        adv = group_advantages(rewards).view(-1, 1)  # [B, 1]
        t = torch.tensor(traj.times[:-1]).repeat_interleave(prompts * group)
        t_next = torch.tensor(traj.times[1:]).repeat_interleave(prompts * group)
        x, x_next = traj.states[:-1].flatten(0, 1), traj.states[1:].flatten(0, 1)  # [T*B, 1, dim]
        old = traj.log_probs.flatten()
        for _ in range(2):
            v = b.expand_as(x)
            log_prob = sde_log_prob(x, x_next, v, t, t_next, a=a)
            kl = sde_step_kl(v, b_ref.expand_as(x), t, t_next, a=a)
            loss, figures = grpo_loss(log_prob.view(steps, -1).T, old.view(steps, -1).T, adv, clip_range=0.2,
                                      kl=kl.view(steps, -1).T, kl_beta=0.01)
            if first_update:  # the policy that sampled: every ratio is exactly 1
                assert torch.equal(log_prob.detach(), old)
                assert figures["clip_fraction"].item() == 0.0 and figures["ratio_mean"].item() == 1.0
                first_update = False
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = held_out_reward()
    print(f"rollout mean rewards: {[round(r, 2) for r in curve]}; held-out: {before:.3f} -> {after:.3f}")
    assert after > before + 1.0, (before, after)
    assert (b.detach() + target).norm() < 0.5 * target.norm()  # x_0 = noise - b heads to the target
