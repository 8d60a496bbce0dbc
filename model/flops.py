"""FLOPs and parameters of the MMDiT, computed from its shape: the basis of TFLOP/s and MFU.

Conventions (the ones MFU is usually reported in, written down so numbers stay comparable):

- Only matrix multiplications count, 2*m*n*k each (a multiply and an add). Norms, RoPE, softmax,
  activations, modulation arithmetic and bias adds are left out: they are a few percent of the
  time and none of the tensor-core FLOPs.
- Shapes: `image_tokens` are packed target tokens ((H/16) * (W/16) for a pixel image, see
  `model/flow.py:image_seq_len`), `cond_image_tokens` the packed condition tokens of an edit
  (appended after the target), `text_tokens` the padded text length of the batch: attention and
  the text stream compute over padding too, so padded tokens cost as much as real ones.
- Attention is non-causal over the joint sequence S = text + image + condition tokens: scores
  q @ k^T and the weighted sum p @ v, each 2 * S * S * hidden per sample (summed over heads).
- Backward = 2x forward for every matmul (a gradient for the input and one for the weight), except
  for the two input-side layers whose input is data and needs no gradient (`img_in` on the packed
  latents, the timestep MLP's first linear on the sinusoids): 1x, the weight gradient only. That
  is exactly what autograd runs, so `step_flops` equals `torch.utils.flop_counter.FlopCounterMode`
  over one forward+backward (tests/test_flops.py; on CPU with SDPA's math backend, since torch has
  no FLOP formula for the default CPU attention kernel). At the 20B shape it is within 1e-5 of
  the usual "3x forward".
- Attention backward is counted as 2x its forward (4 matmuls). Flash attention also recomputes
  the scores in backward (FlopCounterMode counts 5 matmuls for the fused kernels); like any
  rematerialization, that is hardware work, not model work, and MFU leaves it out.
- Recompute (activation checkpointing) is not in `step_flops`: MFU is model FLOPs per second, and
  a job that recomputes more does not do more useful work. `recompute_extra_flops` gives the
  extra forward FLOPs of a recompute policy, for hardware FLOP/s (HFU) when wanted.
- The last block computes no text-stream output (no `to_add_out`, no text MLP): not counted.
- The AdaLN modulation linears (a third of the parameters) act once per sample, not per token:
  at 20B they are ~1/3 of the weights and ~1e-4 of the FLOPs. So the 6 * params * tokens rule
  overestimates an MMDiT (each token also meets only its own stream's weights): do not use it.
- Counts are for the whole model and the given batch, never per rank: for a TP x DP job pass the
  global batch and all devices to `mfu`. Replicated work (TP ranks each running the small
  embeddings and head) is counted once, as model FLOPs should be.
"""

from dataclasses import dataclass

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import RECOMPUTE_POLICIES

TIMESTEP_FEATURES = 256
"""Width of the sinusoidal timestep features fed to the timestep MLP (model/mmdit.py)."""



@dataclass(frozen=True)
class Shapes:
    """The token counts of one step; all FLOP formulas below read them from here."""

    batch: int
    image: int
    text: int
    cond: int = 0

    def __post_init__(self):
        if self.batch < 1 or self.image < 1 or self.text < 0 or self.cond < 0:
            raise ValueError(f"need batch >= 1, image_tokens >= 1, text/cond tokens >= 0, got {self}")

    @property
    def image_all(self) -> int:
        """Image-stream tokens: target + condition."""
        return self.image + self.cond

    @property
    def joint(self) -> int:
        """Attention sequence length: text + target + condition."""
        return self.text + self.image + self.cond


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _modulation(a: MMDiTArgs, s: Shapes) -> int:
    d = a.hidden_size
    return 2 * _mm(s.batch, d, 6 * d)  # img_mod + txt_mod: once per sample


def _attention(a: MMDiTArgs, s: Shapes, text_output: bool) -> int:
    """q/k/v of both streams, scores and values over the joint sequence, output projections."""
    d, b = a.hidden_size, s.batch
    qkv = 3 * _mm(b * s.image_all, d, d) + 3 * _mm(b * s.text, d, d)
    core = 2 * _mm(b * s.joint, a.attention_head_dim, s.joint) * a.num_attention_heads  # q k^T, p v
    out = _mm(b * s.image_all, d, d) + (_mm(b * s.text, d, d) if text_output else 0)
    return qkv + core + out


def _mlp(a: MMDiTArgs, s: Shapes, text_output: bool) -> int:
    d, f, b = a.hidden_size, a.mlp_hidden_size, s.batch
    img = 2 * _mm(b * s.image_all, d, f)
    return img + (2 * _mm(b * s.text, d, f) if text_output else 0)


def block_forward_flops(a: MMDiTArgs, s: Shapes, index: int) -> int:
    """Forward matmul FLOPs of block `index` (the last one has no text output)."""
    text_output = index < a.num_layers - 1
    return _modulation(a, s) + _attention(a, s, text_output) + _mlp(a, s, text_output)


def forward_breakdown(args: MMDiTArgs, batch_size: int, image_tokens: int, text_tokens: int,
                      cond_image_tokens: int = 0) -> dict[str, int]:
    """Forward matmul FLOPs by part; the keys are the model's modules."""
    a, s = args, Shapes(batch_size, image_tokens, text_tokens, cond_image_tokens)
    d, b = a.hidden_size, s.batch
    layers = range(a.num_layers)
    return {
        "img_in": _mm(b * s.image_all, a.in_channels, d),
        "txt_in": _mm(b * s.text, a.joint_attention_dim, d),
        "time_text_embed.linear_1": _mm(b, TIMESTEP_FEATURES, d),
        "time_text_embed.linear_2": _mm(b, d, d),
        "blocks.modulation": a.num_layers * _modulation(a, s),
        "blocks.attention": sum(_attention(a, s, i < a.num_layers - 1) for i in layers),
        "blocks.mlp": sum(_mlp(a, s, i < a.num_layers - 1) for i in layers),
        "norm_out": _mm(b, d, 2 * d),
        "proj_out": _mm(b * s.image_all, d, a.patch_size**2 * a.out_channels),
    }


# Matmuls whose input is data (no gradient flows into it): backward computes the weight gradient only.
_NO_INPUT_GRAD = ("img_in", "time_text_embed.linear_1")


def step_flops(args: MMDiTArgs, batch_size: int, image_tokens: int, text_tokens: int,
               cond_image_tokens: int = 0, backward: bool = True) -> int:
    """Model FLOPs of one training step (forward, plus backward when `backward`), no recompute.

    batch_size samples of `image_tokens` packed target tokens, `text_tokens` (padded) text tokens
    and `cond_image_tokens` packed condition tokens each. See the module docstring for what counts.
    """
    parts = forward_breakdown(args, batch_size, image_tokens, text_tokens, cond_image_tokens)
    total = sum(parts.values())
    if backward:
        total += sum(f if name in _NO_INPUT_GRAD else 2 * f for name, f in parts.items())
    return total


def recompute_extra_flops(args: MMDiTArgs, batch_size: int, image_tokens: int, text_tokens: int,
                          cond_image_tokens: int = 0, policy: str = "full", every: int = 2) -> int:
    """Forward FLOPs run a second time in backward by a recompute policy (parallel/recompute.py).

    `full` re-runs every block, `every_k` blocks 0, k, 2k..., `attention` each block's
    q/k/v + attention + output projections, `mlp` each block's MLPs; `elementwise` keeps every
    matmul and attention output, so it re-runs no counted FLOPs (only elementwise ops). Add this to
    `step_flops` for hardware FLOPs (HFU); MFU uses `step_flops` alone.
    """
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"recompute policy must be one of {RECOMPUTE_POLICIES}, got {policy!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    a, s = args, Shapes(batch_size, image_tokens, text_tokens, cond_image_tokens)
    layers = range(a.num_layers)
    if policy in ("none", "elementwise"):
        return 0
    if policy == "full":
        return sum(block_forward_flops(a, s, i) for i in layers)
    if policy == "every_k":
        return sum(block_forward_flops(a, s, i) for i in layers if i % every == 0)
    part = _attention if policy == "attention" else _mlp
    return sum(part(a, s, i < a.num_layers - 1) for i in layers)


def model_params(args: MMDiTArgs, trainable_only: bool = False) -> int:
    """Parameters of the whole model (all TP ranks together), counted from the shape.

    trainable_only leaves out the last block's `to_add_out` and text MLP, which exist (for
    checkpoint compatibility) but never get a gradient.
    """
    a = args
    d, f, j, h = a.hidden_size, a.mlp_hidden_size, a.joint_attention_dim, a.attention_head_dim

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    embed = linear(TIMESTEP_FEATURES, d) + linear(d, d) + j + linear(a.in_channels, d) + linear(j, d)
    modulation = 2 * linear(d, 6 * d)
    attention = 8 * linear(d, d) + 4 * h  # q/k/v/out of both streams, 4 per-head RMSNorm scales
    mlp = linear(d, f) + linear(f, d)
    block = modulation + attention + 2 * mlp
    head = linear(d, 2 * d) + linear(d, a.patch_size**2 * a.out_channels)
    total = embed + a.num_layers * block + head
    if trainable_only:
        total -= linear(d, d) + mlp
    return total


# Peak dense (no sparsity) bf16 tensor FLOP/s per device, from the vendors' datasheets. Matched by
# substring of `torch.cuda.get_device_name()`, most specific first.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "H800": 989e12,
    "H200 NVL": 835e12,  # the 600 W PCIe card, not the SXM part
    "H200": 989e12,
    "H20": 148e12,
    "GH200": 989e12,
    "GB200": 2500e12,
    "B200": 2250e12,
    "B100": 1750e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "MI300X": 1307e12,
    "MI325X": 1307e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device by name (e.g. "NVIDIA H100 80GB HBM3"); None if unknown."""
    # Longest key first, so "H100 PCIe" wins over "H100" and "GH200" over "H200".
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak, in [0, 1]."""
    if step_time_s <= 0 or num_devices < 1 or peak_flops_per_device <= 0:
        raise ValueError(f"need step_time_s > 0, num_devices >= 1, peak > 0; got "
                         f"{step_time_s}, {num_devices}, {peak_flops_per_device}")
    return flops_per_step / (step_time_s * num_devices * peak_flops_per_device)
