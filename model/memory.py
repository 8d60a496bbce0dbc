"""Per-GPU memory of a training layout, predicted from the model's shape: `mmdit capacity --memory`.

A layout is TP (with or without sequence parallelism), DP, whether the optimizer state is sharded
over DP (megatron's DistributedOptimizer, torch's ZeroRedundancyOptimizer), the recompute policy,
the micro-batch, the image size and the padded text length, full training or LoRA. Its memory:

- **parameters** in the compute dtype; the blocks' linears are split over TP, the embeddings, the
  output head and the norms are replicated;
- **gradients** in fp32 (the megatron backend reduces in fp32: `grad_reduce_in_fp32`), one per
  trainable parameter, not sharded (megatron's DDP keeps the whole buffer);
- **optimizer state**: Adam's two moments in fp32 and, when the parameters are bf16, an fp32 master
  copy: 12 bytes per trainable parameter (8 in fp32), divided by DP when sharded;
- **activations**: what each block saves for backward, counted per token below (the count the
  sequence-parallel benchmark uses, itemized per tensor and dtype), the peak adding what backward
  holds while it recomputes one checkpointed block;
- **workspace**: what the allocator does not report as tensors or cannot reuse: the CUDA context,
  cuBLAS/NCCL buffers, fragmentation (an assumption, a parameter).

LoRA (`train.lora`, model/lora.py): the base weights frozen in the compute dtype (no gradient, no
optimizer state); only the adapters (A [r, in], B [out, r] per targeted linear, split as their base)
get gradients and optimizer state. Activations stay as in full training (the base linears' inputs
are saved by the adapters' first matmul instead).

What a block saves, per token of a stream, for the eager model (`parallel.layers=local`, SDPA),
in bytes per hidden unit D (e = bytes of the compute dtype, 4 for fp32 work):

    attention sub-layer, replicated over TP: LayerNorm input, its output (kept by the modulation's
        multiply), the modulated input of q/k/v, the attention output kept by the gate: 4e
    attention, split over TP: q/k RMSNorm in fp32 (the q/k/v projection output when e = 4, else
        two fp32 copies of q and of k), the normalized q and k (fp32), v, the rotated q and k, the
        attention output and the output projection's contiguous input: 5e + 8 + (3e or 24)
    MLP, replicated: LayerNorm input and output, the modulated input, the output kept by the
        gate: 4e;  split: the hidden activation before and after GELU: 2 x mlp_ratio x e

The last block computes no text output: its text tokens save only the attention's q/k/v side.
Sequence parallelism splits every one of them over TP (mmdit's column linears keep this rank's
shard and gather again in backward). tests/test_memory.py measures a small model's activations on
the CPU and compares (fp32 and bf16, each recompute policy). torch.compile and Transformer
Engine's linears save less (fused elementwise ops), so this is an upper bound for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import RECOMPUTE_POLICIES
from mmdit.model.flops import model_params

GIB = 2**30
FP32 = 4
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
LORA_TARGETS = ("attention", "mlp", "modulation")
"""Which linears LoRA adapts, by group: the attention projections of both streams (q, k, v, out),
the MLPs of both streams, the modulation linears. config/lora.py's default is attention + mlp."""


@dataclass(frozen=True)
class Layout:
    """One way to train a model: parallelism, memory policy, batch shape."""

    tp: int = 1
    sequence_parallel: bool = False
    dp: int = 1
    shard_optimizer: bool = True
    """Optimizer state sharded over DP (megatron DistributedOptimizer / torch ZeRO-1)."""
    recompute: str = "none"
    recompute_every: int = 2
    micro_batch: int = 1
    height: int = 1328
    width: int = 1328
    text_tokens: int = 256
    """Padded text length of a micro-batch (the longest prompt in it)."""
    dtype: str = "bf16"
    lora_rank: int = 0
    """0: full training; r > 0: LoRA of rank r on `lora_targets`."""
    lora_targets: tuple[str, ...] = ("attention", "mlp")

    def __post_init__(self):
        if self.tp < 1 or self.dp < 1 or self.micro_batch < 1 or self.text_tokens < 0 or self.lora_rank < 0:
            raise ValueError(f"tp, dp, micro_batch >= 1 and text_tokens, lora_rank >= 0 needed, got {self}")
        if self.recompute not in RECOMPUTE_POLICIES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_POLICIES}, got {self.recompute!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"image {self.height}x{self.width} must be a multiple of 16 px")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets must be from {LORA_TARGETS}, got {sorted(unknown)}")

    @property
    def image_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    def describe(self) -> str:
        parts = [f"TP{self.tp}" + ("+SP" if self.sequence_parallel and self.tp > 1 else ""), f"DP{self.dp}",
                 f"recompute={self.recompute}" + (f"/{self.recompute_every}" if self.recompute == "every_k" else "")]
        if self.lora_rank:
            parts.append(f"LoRA r={self.lora_rank}")
        return " ".join(parts)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (the most loaded TP rank; all ranks are alike)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    """Peak activation memory of a step: saved for backward plus backward's recompute of one block."""
    saved_activations: float
    """Held at the end of forward (what `bench/common.py` calls saved)."""
    workspace: float

    @property
    def allocated(self) -> float:
        """What `torch.cuda.max_memory_allocated()` should report at the step's peak."""
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> float:
        return self.allocated + self.workspace

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "allocated": self.allocated, "total": self.total}


# --- activations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _PerToken:
    """Bytes per token of one stream, split into the part replicated over TP and the part split."""

    replicated: float = 0.0
    split: float = 0.0

    def __add__(self, other: _PerToken) -> _PerToken:
        return _PerToken(self.replicated + other.replicated, self.split + other.split)

    def __sub__(self, other: _PerToken) -> _PerToken:
        return _PerToken(self.replicated - other.replicated, self.split - other.split)

    def per_rank(self, tp: int, sequence_parallel: bool) -> float:
        if sequence_parallel:
            return (self.replicated + self.split) / tp
        return self.replicated + self.split / tp


def _attention(a: MMDiTArgs, e: int, output: bool) -> _PerToken:
    d = a.hidden_size
    qk_norm = (3 * e if e == FP32 else 2 * 2 * FP32) + 2 * FP32  # fp32 inputs of the norm, normalized q, k
    qkv_side = qk_norm + e + 2 * e + e  # + v, rotated q and k, attention output
    if not output:  # last block's text tokens: no output projection, nothing to gate
        return _PerToken(3 * e * d, qkv_side * d)
    return _PerToken(4 * e * d, (qkv_side + e) * d)


def _mlp(a: MMDiTArgs, e: int, output: bool) -> _PerToken:
    if not output:
        return _PerToken()
    return _PerToken(4 * e * a.hidden_size, 2 * e * a.mlp_hidden_size)


def _inputs(a: MMDiTArgs, e: int) -> _PerToken:
    """What a checkpointed region keeps: its input (the residual stream)."""
    return _PerToken(e * a.hidden_size)


def _kept_by_elementwise(a: MMDiTArgs, e: int, output: bool) -> _PerToken:
    """`elementwise` keeps matmul and attention outputs: q/k/v, the attention output, the output
    projection, the MLP's hidden and output (parallel/recompute.py KEPT_OPS), and the input."""
    d = a.hidden_size
    if not output:
        return _PerToken(e * d, 4 * e * d)
    return _PerToken(3 * e * d, (4 * e * d + e * a.mlp_hidden_size))


def _block(a: MMDiTArgs, e: int, policy: str, checkpointed: bool, output: bool) -> tuple[_PerToken, _PerToken]:
    """(saved, recomputed in backward) per token of one block for one stream."""
    attention, mlp = _attention(a, e, output), _mlp(a, e, output)
    whole = attention + mlp
    if policy == "none" or not checkpointed:
        return whole, _PerToken()
    if policy in ("full", "every_k"):
        return _inputs(a, e), whole
    if policy == "elementwise":  # backward re-runs only what was not kept
        kept = _kept_by_elementwise(a, e, output)
        return kept, whole - kept
    # selective: the region keeps its input, the gate outside it keeps its output
    gated = _PerToken(e * a.hidden_size) if output else _PerToken()
    kept = _inputs(a, e) + gated
    if policy == "attention":
        # Backward reaches the attention after the block's MLP tensors are freed; it holds the
        # gradients of q, k and v beside the recomputed tensors.
        return kept + mlp, attention - kept - mlp + _PerToken(0, 3 * e * a.hidden_size)
    if not output:  # the last block's text stream has no MLP to recompute
        return attention, _PerToken()
    return attention + kept, mlp - kept


def activation_bytes(args: MMDiTArgs, layout: Layout) -> tuple[float, float]:
    """(saved at the end of forward, peak during backward) activation bytes of one micro-batch step
    on one GPU."""
    a, lay = args, layout
    e = DTYPE_BYTES[lay.dtype]
    tp, sp = lay.tp, lay.sequence_parallel and lay.tp > 1
    n_img, n_txt = lay.micro_batch * lay.image_tokens, lay.micro_batch * lay.text_tokens
    blocks = []  # (saved, recomputed in backward) bytes of each block
    for index in range(a.num_layers):
        checkpointed = lay.recompute != "every_k" or index % lay.recompute_every == 0
        img_saved, img_redo = _block(a, e, lay.recompute, checkpointed, True)
        txt_saved, txt_redo = _block(a, e, lay.recompute, checkpointed, index < a.num_layers - 1)
        blocks.append((n_img * img_saved.per_rank(tp, sp) + n_txt * txt_saved.per_rank(tp, sp),
                       n_img * img_redo.per_rank(tp, sp) + n_txt * txt_redo.per_rank(tp, sp)))
    saved = sum(b for b, _ in blocks) + _outside_blocks(a, e, n_img, n_txt)
    # Backward runs the blocks last to first, freeing each block's tensors when done with it; a
    # checkpointed block's recompute adds to what is still alive then.
    alive, peak = saved, saved
    for block_saved, redo in reversed(blocks):
        peak = max(peak, alive + max(redo, 0.0))
        alive -= block_saved
    return saved, peak


def _outside_blocks(a: MMDiTArgs, e: int, n_img: int, n_txt: int) -> float:
    """Replicated on every TP rank: img_in's input (latents), the output head's LayerNorm input
    and output and proj_out's input, the fp32 prediction the loss keeps; txt_norm (fp32, as the
    q/k norms) and txt_in's input."""
    d, j = a.hidden_size, a.joint_attention_dim
    out_channels = a.patch_size**2 * a.out_channels
    image = a.in_channels * e + 3 * d * e + out_channels * FP32
    text = (j * FP32 if e == FP32 else 3 * j * FP32) + j * e
    return n_img * image + n_txt * text


# --- parameters, gradients, optimizer --------------------------------------------------------

def _block_params(a: MMDiTArgs) -> int:
    one = dataclasses.replace(a, num_layers=1)
    return model_params(dataclasses.replace(a, num_layers=2)) - model_params(one)


def params_per_rank(args: MMDiTArgs, tp: int) -> float:
    """The blocks' parameters split over TP (their few replicated biases and norm scales are
    counted as split), everything outside the blocks replicated."""
    block = _block_params(args)
    outside = model_params(args) - args.num_layers * block
    return args.num_layers * block / tp + outside


def lora_params_per_rank(args: MMDiTArgs, rank: int, tp: int, targets: tuple[str, ...]) -> float:
    """Adapter parameters on one TP rank: per targeted linear A [r, in] and B [out, r]; a
    column-parallel base splits B (out), a row-parallel one A (in)."""
    d, f = args.hidden_size, args.mlp_hidden_size

    def column(n_in: int, n_out: int) -> float:
        return rank * n_in + rank * n_out / tp

    def row(n_in: int, n_out: int) -> float:
        return rank * n_in / tp + rank * n_out

    per_block = 0.0
    if "attention" in targets:  # q, k, v (column) and the output projection (row), both streams
        per_block += 2 * (3 * column(d, d) + row(d, d))
    if "mlp" in targets:
        per_block += 2 * (column(d, f) + row(f, d))
    if "modulation" in targets:
        per_block += 2 * column(d, 6 * d)
    return args.num_layers * per_block


def state_bytes(args: MMDiTArgs, layout: Layout) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer state) bytes on one GPU."""
    e = DTYPE_BYTES[layout.dtype]
    base = params_per_rank(args, layout.tp)
    trainable = (lora_params_per_rank(args, layout.lora_rank, layout.tp, layout.lora_targets)
                 if layout.lora_rank else base)
    params = base * e + (trainable * e if layout.lora_rank else 0)
    grads = trainable * FP32
    optimizer = trainable * (2 * FP32 + (FP32 if e < FP32 else 0))
    if layout.shard_optimizer:
        optimizer /= layout.dp
    return params, grads, optimizer


def predict(args: MMDiTArgs, layout: Layout, workspace_gib: float = 3.0, fragmentation: float = 0.10) -> Memory:
    """Per-GPU memory of `layout`. `workspace_gib`: the CUDA context, cuBLAS and NCCL buffers;
    `fragmentation`: the share of activation memory the caching allocator cannot reuse."""
    params, grads, optimizer = state_bytes(args, layout)
    saved, peak = activation_bytes(args, layout)
    return Memory(params, grads, optimizer, peak, saved, workspace_gib * GIB + fragmentation * peak)


def layouts(gpus: int, tps=(1, 2, 4, 8), policies=("none", "elementwise", "attention", "full"),
            lora_rank: int = 64, **shape) -> list[Layout]:
    """The layouts the capacity table compares for a job of `gpus` GPUs (DP = gpus / TP): every TP
    size with and without sequence parallelism and recompute policy, then LoRA at TP 1."""
    out = []
    for tp in tps:
        for sp in ((False, True) if tp > 1 else (False,)):
            for policy in policies:
                out.append(Layout(tp=tp, sequence_parallel=sp, dp=max(1, gpus // tp), recompute=policy, **shape))
    for policy in policies:
        out.append(Layout(tp=1, dp=gpus, recompute=policy, lora_rank=lora_rank, **shape))
    return out
