"""Flow matching: the path, the loss mask, training sigmas, sampling sigmas equal to diffusers'."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmdit.model.flow import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    euler_sample,
    flow_matching_loss,
    image_seq_len,
    noisy_input,
    sample_training_sigmas,
    scheduler_sigmas,
    shift_mu,
    time_shift,
    velocity_target,
)

# Qwen/Qwen-Image scheduler/scheduler_config.json, spelled out so a wrong value in flow.py fails.
PUBLISHED_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def _diffusers_sigmas(num_steps: int, seq_len: int) -> torch.Tensor:
    """What QwenImagePipeline.__call__ sets on its scheduler (its step 5, 'Prepare timesteps')."""
    cfg = PUBLISHED_CONFIG
    scheduler = FlowMatchEulerDiscreteScheduler(**cfg)
    # the pipeline's calculate_shift
    span = cfg["max_image_seq_len"] - cfg["base_image_seq_len"]
    m = (cfg["max_shift"] - cfg["base_shift"]) / span
    mu = seq_len * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas


def test_scheduler_config_is_the_published_one():
    assert QWEN_IMAGE_SCHEDULER_CONFIG == PUBLISHED_CONFIG


SIZES = [(256, 256), (512, 768), (1328, 1328), (1664, 928), (928, 1664), (2048, 2048)]


@pytest.mark.parametrize("num_steps", [2, 4, 20, 50])
@pytest.mark.parametrize("size", SIZES)
def test_scheduler_sigmas_equal_diffusers(num_steps, size):
    seq_len = image_seq_len(*size)
    ours = scheduler_sigmas(num_steps, seq_len)
    ref = _diffusers_sigmas(num_steps, seq_len)
    assert ours.shape == (num_steps + 1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0
    terminal = PUBLISHED_CONFIG["shift_terminal"]
    assert math.isclose(ours[-2].item(), terminal, abs_tol=1e-6)


def test_scheduler_sigmas_rejects_one_step():
    with pytest.raises(ValueError, match="num_steps"):
        scheduler_sigmas(1, 4096)


def test_image_seq_len_and_shift_mu():
    assert image_seq_len(1328, 1328) == 83 * 83
    assert image_seq_len(1664, 928) == 104 * 58
    assert image_seq_len(256, 256) == 256
    with pytest.raises(ValueError, match="multiples of 16"):
        image_seq_len(1000, 1001)
    assert shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert shift_mu(8192) == pytest.approx(0.9, abs=1e-12)
    assert shift_mu(4096) == pytest.approx(0.5 + (4096 - 256) * 0.4 / 7936, abs=1e-12)


def test_time_shift_fixes_endpoints_and_raises_middle():
    s = torch.tensor([1e-9, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    shifted = time_shift(0.7, s)
    assert shifted[0] < 1e-8 and shifted[-1] == 1.0
    assert torch.all(shifted[1:4] > s[1:4])
    assert shifted[2].item() == pytest.approx(math.exp(0.7) / (math.exp(0.7) + 1.0))


def test_noisy_input_endpoints_and_target():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 10, 64, generator=g), torch.randn(3, 10, 64, generator=g)
    out = noisy_input(x0, noise, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(out[0], x0[0], atol=0, rtol=0)
    torch.testing.assert_close(out[1], noise[1], atol=0, rtol=0)
    torch.testing.assert_close(out[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(velocity_target(x0, noise), noise - x0)
    with pytest.raises(ValueError, match="sigmas"):
        noisy_input(x0, noise, torch.tensor([0.5, 0.5]))


def test_euler_sampler_recovers_x0_from_exact_velocity():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 64, generator=g), torch.randn(2, 16, 64, generator=g)
    seq_len = 16

    def constant(x, sigma):  # the velocity of the straight path through (x0, noise)
        assert sigma.shape == (2,) and sigma.dtype == torch.float32
        return noise - x0

    torch.testing.assert_close(euler_sample(constant, noise, 20, seq_len), x0, atol=1e-5, rtol=0)

    # The same field read off the current point: exact only if x and sigma agree at every step.
    def from_state(x, sigma):
        return (x - x0) / sigma.view(-1, 1, 1)

    torch.testing.assert_close(euler_sample(from_state, noise, 7, seq_len), x0, atol=1e-5, rtol=0)

    seen = []
    euler_sample(lambda x, s: seen.append(s[0].item()) or torch.zeros_like(x), noise, 5, 4096)
    assert seen == scheduler_sigmas(5, 4096)[:-1].tolist()


def test_loss_ignores_masked_tokens():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    loss = flow_matching_loss(pred, target, mask)
    expected = (pred - target)[mask].square().mean()
    torch.testing.assert_close(loss, expected)

    changed = pred.clone()
    changed[~mask] += 100.0
    assert flow_matching_loss(changed, target, mask).item() == loss.item()
    changed[0, 0, 0] += 1.0
    assert flow_matching_loss(changed, target, mask).item() != loss.item()

    torch.testing.assert_close(flow_matching_loss(pred, target), (pred - target).square().mean())
    with pytest.raises(ValueError, match="no tokens"):
        flow_matching_loss(pred, target, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        flow_matching_loss(pred, target, mask.float())


def test_loss_gradient_skips_masked_tokens():
    pred = torch.randn(1, 4, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True, False]])
    flow_matching_loss(pred, torch.zeros(1, 4, 3), mask).backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.all(pred.grad[mask] != 0)


@pytest.mark.parametrize("logit_mean", [0.0, 0.8])
def test_logit_normal_median_without_shift(logit_mean):
    g = torch.Generator().manual_seed(3)
    s = sample_training_sigmas(
        100_000, sampling="logit_normal", logit_mean=logit_mean, generator=g
    )
    assert s.shape == (100_000,) and s.dtype == torch.float32
    assert s.median().item() == pytest.approx(1 / (1 + math.exp(-logit_mean)), abs=0.01)
    assert torch.all((s > 0) & (s < 1))


def test_uniform_sigmas_and_determinism():
    def draw():
        g = torch.Generator().manual_seed(4)
        return sample_training_sigmas(50_000, sampling="uniform", generator=g)

    s, again = draw(), draw()
    assert torch.all((s > 0) & (s < 1)) and s.mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(s, again)
    with pytest.raises(ValueError, match="sampling"):
        sample_training_sigmas(4, sampling="cosine")


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_shifted_sigmas_larger_at_higher_resolution(sampling):
    def draw(seq_len):
        g = torch.Generator().manual_seed(5)
        return sample_training_sigmas(
            10_000, sampling=sampling, image_seq_len=seq_len, generator=g
        )

    low, high = draw(image_seq_len(256, 256)), draw(image_seq_len(1328, 1328))
    base = draw(None)
    torch.testing.assert_close(low, time_shift(0.5, base.double()).float(), atol=1e-6, rtol=0)
    assert torch.all(high >= low) and high.mean() > low.mean() + 0.03
    assert torch.all((high > 0) & (high < 1))
