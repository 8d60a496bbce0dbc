"""Rectified flow matching in the diffusers convention, with Qwen-Image's resolution shift.

Training and sampling must agree with diffusers' `QwenImagePipeline`, or weights we export would
sample wrongly there: the path is `x_s = (1 - s) * x0 + s * noise` (s = 1 is pure noise), the
model predicts the velocity `noise - x0`, and the timestep it sees is sigma itself (the
pipeline feeds `t / 1000` with `t = 1000 * sigma`). Larger images keep more structure at a given
sigma, so both training sigmas and sampling sigmas are shifted towards 1 by `mu`, which grows
linearly with the number of packed image tokens.
"""

import math
from collections.abc import Callable

import torch

#: `scheduler/scheduler_config.json` of Qwen/Qwen-Image (diffusers FlowMatchEulerDiscreteScheduler).
QWEN_IMAGE_SCHEDULER_CONFIG = {
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

SIGMA_SAMPLINGS = ("uniform", "logit_normal")
_SIGMA_EPS = 1e-5
"""Training sigmas are kept in [eps, 1 - eps]: the shift divides by s, and s = 0 has no signal."""


def image_seq_len(height_px: int, width_px: int, vae_scale: int = 8, patch: int = 2) -> int:
    """Packed image tokens of one image: (H / vae_scale / patch) * (W / vae_scale / patch)."""
    unit = vae_scale * patch
    if height_px <= 0 or width_px <= 0 or height_px % unit or width_px % unit:
        raise ValueError(f"image size {height_px}x{width_px} must be positive multiples of {unit}")
    return (height_px // unit) * (width_px // unit)


def shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
) -> float:
    """The shift for `image_seq_len` tokens: linear through (base, base_shift), (max, max_shift).

    Not clamped outside [base, max]: the pipeline's `calculate_shift` extrapolates, and so do we.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + (image_seq_len - base_seq_len) * slope


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Exponential shift `e^mu / (e^mu + (1/s - 1))`: fixes 0 and 1, pushes the rest towards 1."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def sample_training_sigmas(
    batch_size: int,
    *,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    image_seq_len: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training sigmas [B] in (0, 1), float32; shifted by the resolution's mu (None: no shift).

    Logit-normal (SD3) spends more steps at mid noise, where the velocity is hardest to predict.
    Draw from `generator` only, so a seeded run repeats exactly.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if sampling == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
    elif sampling == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        normal = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float64)
        sigmas = torch.sigmoid(logit_mean + logit_std * normal)
    else:
        raise ValueError(f"sampling must be one of {SIGMA_SAMPLINGS}, got {sampling!r}")
    sigmas = sigmas.clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)
    if image_seq_len is not None:
        sigmas = time_shift(shift_mu(image_seq_len), sigmas).clamp(_SIGMA_EPS, 1.0 - _SIGMA_EPS)
    return sigmas.float()


def _per_sample(sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigmas [B] -> [B, 1, ...] broadcastable against x."""
    if sigmas.dim() != 1 or sigmas.shape[0] != x.shape[0]:
        raise ValueError(f"sigmas must be [B={x.shape[0]}], got {tuple(sigmas.shape)}")
    return sigmas.view(-1, *([1] * (x.dim() - 1)))


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The point `(1 - s) * x0 + s * noise` on the straight path, in x0's dtype."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _per_sample(sigmas, x0)
    return ((1.0 - s) * x0 + s * noise).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_s / d s = noise - x0: what the model predicts (diffusers' sign)."""
    return noise - x0


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE (float32) over the selected target-image tokens of packed [B, N, C] tensors.

    `token_mask` [B, N] bool marks the tokens that count; condition-image tokens and padding
    must be False, so the model is never trained to denoise what it is given. The mean is over
    the selected elements, so the loss scale does not depend on how many tokens are masked.
    The empty-mask check reads one value back from the device.
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be equal [B, N, C]"
        )
    sq = (pred.float() - target.float()).square()
    if token_mask is None:
        return sq.mean()
    if token_mask.dtype != torch.bool or token_mask.shape != pred.shape[:2]:
        raise ValueError(
            f"token_mask must be bool {tuple(pred.shape[:2])}, "
            f"got {token_mask.dtype} {tuple(token_mask.shape)}"
        )
    weight = token_mask.unsqueeze(-1).to(sq.dtype)
    count = weight.sum() * pred.shape[-1]
    if not bool(count > 0):
        raise ValueError("token_mask selects no tokens: there is nothing to train on")
    return (sq * weight).sum() / count


def scheduler_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The sampling sigmas [num_steps + 1] of QwenImagePipeline, ending in 0, float32.

    Reproduces FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG).set_timesteps(
    sigmas=linspace(1, 1/num_steps, num_steps), mu=shift_mu(image_seq_len)): shift, then stretch
    so the last non-zero sigma is `shift_terminal`, then append 0.
    """
    if num_steps < 2:
        # One step makes diffusers' terminal stretch divide 0 by 0 (its sigmas are NaN).
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    cfg = QWEN_IMAGE_SCHEDULER_CONFIG
    mu = shift_mu(
        image_seq_len,
        cfg["base_image_seq_len"],
        cfg["max_image_seq_len"],
        cfg["base_shift"],
        cfg["max_shift"],
    )
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = time_shift(mu, base)
    one_minus = 1.0 - shifted
    stretched = 1.0 - one_minus / (one_minus[-1] / (1.0 - cfg["shift_terminal"]))
    return torch.cat([stretched, torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def euler_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int,
    image_seq_len: int,
) -> torch.Tensor:
    """Integrate dx/ds = v from s = 1 (noise) to s = 0 with Euler steps on the pipeline's sigmas.

    `velocity_fn(x, sigma)` gets x in noise's dtype and sigma as a float32 [B] tensor (the value
    diffusers' pipeline hands the transformer as `timestep`). The state is carried in float32
    between steps; the result is in noise's dtype.
    """
    sigmas = scheduler_sigmas(num_steps, image_seq_len).tolist()
    x = noise.float()
    batch = noise.shape[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((batch,), s, dtype=torch.float32, device=noise.device)
        v = velocity_fn(x.to(noise.dtype), sigma)
        x = x + (s_next - s) * v.float()
    return x.to(noise.dtype)
