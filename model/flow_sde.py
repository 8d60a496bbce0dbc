"""The exploration SDE of Flow-GRPO: stochastic sampling with the log-probability of each step.

GRPO needs a policy with a density. The sampling ODE of model/flow.py (dx/ds = v, integrated
from s = 1 to s = 0) is deterministic; Flow-GRPO replaces it by the reverse-time SDE with the
same marginals,

    dx = [v + sigma_t^2 / (2t) * (x + (1 - t) v)] dt + sigma_t dw,

where t is the noise level (our s: t = 1 is noise, x_t = (1 - t) x0 + t noise) and v is the
model's velocity `noise - x0`, so `x + (1 - t) v` is the model's estimate of the noise and
`-(x + (1 - t) v) / t` its estimate of the score. Sampling runs t downwards, so dt = t_next - t
is negative. Euler-Maruyama makes each step a Gaussian transition

    x_next ~ N(mean, std^2 I),
    mean = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt,     std = sigma_t sqrt(|dt|),

whose mean is the ODE's Euler step `x + dt v` plus a correction of order sigma_t^2: with
sigma_t -> 0 the SDE sampler is the Euler sampler.

The noise schedule (Flow-GRPO's): sigma_t = a * sqrt(t / (1 - t)). It is infinite at t = 1,
where every sampler starts, so t is clipped to at most `t_max` inside the root (Flow-GRPO puts
the schedule's second sigma there, 0.927 to 0.967 for Qwen-Image's sigmas at 10 to 20 steps;
`DEFAULT_T_MAX` = 0.95 fixes it so the schedule does not depend on the step count).
`a` sets the exploration (Flow-GRPO's `noise_level`, 0.7 by default).

Log-probabilities and KLs are reduced over each sample's elements by `reduce`: "mean" (Flow-GRPO's
choice: the ratio exp(logp - logp_old) is then a per-element geometric mean, which stays near 1 for
images of any size) or "sum" (the transition's true joint log-density). The KL between the policy's
and the reference's transitions from the same x and t (equal variances) is, per element,

    (mean_policy - mean_ref)^2 / (2 std^2) = (1 + sigma_t^2 (1 - t) / (2t))^2 |dt| / (2 sigma_t^2) * (v - v_ref)^2.

Everything here is a pure tensor function computed in float32; t and t_next are floats (one step
for the whole batch, as the sampler runs) or [B] tensors (each sample its own step, as an update
over a subset of recorded steps takes them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmdit.model.flow import scheduler_sigmas

DEFAULT_A = 0.7
"""Flow-GRPO's default `noise_level`."""
DEFAULT_T_MAX = 0.95
"""Where sigma_t = a sqrt(t / (1 - t)) is clipped: t is taken as at most this inside the root
(sigma_t <= a * 4.36)."""
REDUCTIONS = ("mean", "sum")


def sde_sigma(t: torch.Tensor | float, a: float = DEFAULT_A, t_max: float = DEFAULT_T_MAX) -> torch.Tensor:
    """sigma_t = a * sqrt(t' / (1 - t')) with t' = min(t, t_max), float32 (a tensor of t's shape)."""
    if a < 0:
        raise ValueError(f"a must be >= 0, got {a}")
    if not 0.0 < t_max < 1.0:
        raise ValueError(f"t_max must be in (0, 1), got {t_max}")
    t = torch.as_tensor(t, dtype=torch.float32).clamp(0.0, t_max)
    return a * torch.sqrt(t / (1.0 - t))


def _per_sample(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A float, or [B] tensor, as a float32 tensor broadcastable against x [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a float or [B={x.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.dim() - 1)))


def _check_times(t: torch.Tensor, t_next: torch.Tensor) -> None:
    """1 >= t > t_next >= 0; checked on the CPU only (on an accelerator it would sync the host)."""
    if t.device.type != "cpu":
        return
    if bool((t <= 0).any() | (t > 1).any() | (t_next >= t).any() | (t_next < 0).any()):
        raise ValueError("a step needs 1 >= t > t_next >= 0 (sampling runs the noise level down)")


def sde_step_moments(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    a: float = DEFAULT_A,
    t_max: float = DEFAULT_T_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian transition of one Euler-Maruyama step from t to t_next: (mean like x, std
    broadcastable against x), float32. `v` is the velocity at (x, t); the mean keeps v's graph."""
    if x.shape != v.shape:
        raise ValueError(f"x {tuple(x.shape)} and v {tuple(v.shape)} differ in shape")
    x, v = x.float(), v.float()
    t, t_next = _per_sample(t, x), _per_sample(t_next, x)
    _check_times(t, t_next)
    dt = t_next - t  # < 0
    sigma = sde_sigma(t, a, t_max)
    drift = v + sigma.square() / (2.0 * t) * (x + (1.0 - t) * v)
    return x + drift * dt, sigma * torch.sqrt(-dt)


def _reduce(per_element: torch.Tensor, reduce: str) -> torch.Tensor:
    """[B, ...] -> [B] by the mean or the sum over each sample's elements."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dims = tuple(range(1, per_element.dim()))
    return per_element.mean(dim=dims) if reduce == "mean" else per_element.sum(dim=dims)


def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """log N(value; mean, std^2) per element, reduced to [B]; std must be > 0."""
    if bool((std <= 0).any()):
        raise ValueError("the log-probability needs std > 0 (a = 0 is the deterministic ODE)")
    per_element = -(value.float() - mean).square() / (2.0 * std.square()) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return _reduce(per_element, reduce)


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, or n of them, one per equal block of rows (a GRPO group
each: a group's noise then does not depend on which other groups share its batch)."""


def cpu_normal(shape: Sequence[int], generator: Generators) -> torch.Tensor:
    """Standard normal float32 noise of `shape` drawn on the CPU from `generator` (or from each
    of a list of generators for its block of the rows, in order)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if not generator or shape[0] % len(generator):
        raise ValueError(f"{len(generator)} generators cannot split {shape[0]} rows into equal blocks")
    block = (shape[0] // len(generator), *shape[1:])
    return torch.cat([torch.randn(block, generator=g, dtype=torch.float32) for g in generator])


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    a: float = DEFAULT_A,
    t_max: float = DEFAULT_T_MAX,
    generator: Generators = None,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic step: (x_next float32, its log-probability [B] under the transition).

    The noise is drawn from `generator` on the CPU (so a seeded rollout repeats on any device);
    x_next is detached from v, the log-probability is not (it is the rollout's `old` log-prob
    when taken under no_grad)."""
    mean, std = sde_step_moments(x, v, t, t_next, a, t_max)
    noise = cpu_normal(mean.shape, generator).to(mean.device)
    x_next = (mean + std * noise).detach()
    return x_next, gaussian_log_prob(x_next, mean, std, reduce)


def sde_log_prob(
    x: torch.Tensor,
    x_next: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    a: float = DEFAULT_A,
    t_max: float = DEFAULT_T_MAX,
    reduce: str = "mean",
) -> torch.Tensor:
    """The log-probability [B] of a recorded transition x -> x_next under velocity v (the
    current policy's, with its graph): what the GRPO update differentiates."""
    mean, std = sde_step_moments(x, v, t, t_next, a, t_max)
    return gaussian_log_prob(x_next.detach(), mean, std, reduce)


def sde_step_kl(
    v: torch.Tensor,
    v_ref: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    a: float = DEFAULT_A,
    t_max: float = DEFAULT_T_MAX,
    reduce: str = "mean",
) -> torch.Tensor:
    """KL(policy transition || reference transition) [B] from the same x, t: closed form (module
    docstring), since both Gaussians share the variance; 0 where v == v_ref; needs a > 0."""
    if v.shape != v_ref.shape:
        raise ValueError(f"v {tuple(v.shape)} and v_ref {tuple(v_ref.shape)} differ in shape")
    if a <= 0:
        raise ValueError("the KL needs a > 0 (a = 0 is the deterministic ODE)")
    v, v_ref = v.float(), v_ref.float()
    t, t_next = _per_sample(t, v), _per_sample(t_next, v)
    _check_times(t, t_next)
    sigma2 = sde_sigma(t, a, t_max).square()
    gain = 1.0 + sigma2 * (1.0 - t) / (2.0 * t)  # d mean / d v, over dt
    per_element = gain.square() * (t - t_next) / (2.0 * sigma2) * (v - v_ref).square()
    return _reduce(per_element, reduce)


@dataclass
class Trajectory:
    """A recorded SDE rollout: the states [T + 1, B, ...] (noise first, the sample last), the
    step times, and each transition's log-probability [T, B] (taken without a graph)."""

    states: torch.Tensor
    times: list[float]
    log_probs: torch.Tensor

    @property
    def sample(self) -> torch.Tensor:
        return self.states[-1]


@torch.no_grad()
def sde_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    image_seq_len: int,
    a: float = DEFAULT_A,
    t_max: float = DEFAULT_T_MAX,
    generator: Generators = None,
    reduce: str = "mean",
) -> Trajectory:
    """The SDE twin of flow.euler_sample: the same sigmas (QwenImagePipeline's, shifted by the
    resolution), the same `velocity_fn(x in noise's dtype, sigma float32 [B])`, the state in
    float32; every state and log-probability recorded for the update. a > 0 (a = 0 is the ODE)."""
    if a <= 0:
        raise ValueError(f"sde_sample needs a > 0 (a = 0 is euler_sample), got {a}")
    times = scheduler_sigmas(num_steps, image_seq_len).tolist()
    x, batch = noise.float(), noise.shape[0]
    states, log_probs = [x], []
    for t, t_next in zip(times[:-1], times[1:]):
        sigma = torch.full((batch,), t, dtype=torch.float32, device=noise.device)
        v = velocity_fn(x.to(noise.dtype), sigma)
        x, log_prob = sde_step(x, v, t, t_next, a, t_max, generator, reduce)
        states.append(x)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(states), times, torch.stack(log_probs))
