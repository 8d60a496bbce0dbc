"""`parallelize()`: the one place a model is built and parallelized, and the record of what it chose.

Every `auto` setting is resolved once, by `resolve`, into a frozen `Plan`: device, compute and
parameter dtypes, linear layers (Transformer Engine or megatron-local), attention kernel, the
sequence parallelism that takes effect, recompute, compile, backend, TP x DP. Everything after
reads the plan, never the config again, so a choice cannot be made twice, or differently.

`parallelize` then applies it in a fixed order, as torchtitan does: build this rank's TP shard
(on the meta device, then materialized: model/mmdit.py), initialize or load the weights, cast,
recompute, compile, and last data parallelism with the optimizer (parallel/backend.py). The
trainer, the sampler, evaluation's previews and the benchmarks all build their model here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from mmdit.config import ConfigError
from mmdit.config.lora import LoraConfig
from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import ParallelConfig
from mmdit.config.train import OptimizerConfig
from mmdit.model.attention import resolve_attention
from mmdit.model.layers import transformer_engine_available
from mmdit.model.mmdit import MMDiT, build_mmdit
from mmdit.parallel.backend import MegatronBackend, TorchBackend, build_backend
from mmdit.parallel.compile import compile_blocks
from mmdit.parallel.recompute import apply_recompute
from mmdit.parallel.state import ParallelDims, dp_group, init_parallel, tp_group
from mmdit.utils.dtypes import resolve_dtype

log = logging.getLogger("mmdit.parallel")

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Plan:
    """What `parallelize` chose, every `auto` resolved: the one record later code reads."""

    device: torch.device
    compute_dtype: torch.dtype
    params_dtype: torch.dtype
    """bf16 under megatron (its optimizer keeps fp32 main weights) and without an optimizer;
    fp32 under the torch backend, whose AdamW updates the parameters themselves."""
    autocast: bool
    """Run forwards under autocast to compute_dtype: only fp32 parameters need it (autocast over
    bf16 parameters would bring norm outputs back as fp32 and recast them at every linear)."""
    layers: str
    """te | local: the linear layers (model/layers.py)."""
    attention: str
    """sdpa | varlen | te (model/attention.py)."""
    sequence_parallel: bool
    """As it takes effect: asked for and tp > 1."""
    recompute: str
    recompute_every: int
    compile: bool
    backend: str | None
    """megatron | torch; None where no optimizer is built (sampling, a frozen reference model)."""
    tp: int
    dp: int

    def describe(self) -> str:
        """The log line of a run's set-up."""
        backend = {"torch": TorchBackend.name, "megatron": MegatronBackend.name, None: "none (no optimizer)"}
        dtype = _DTYPE_NAMES[self.compute_dtype]
        if self.params_dtype != self.compute_dtype:
            dtype += f" (params {_DTYPE_NAMES[self.params_dtype]}{', autocast' if self.autocast else ''})"
        layers = "transformer-engine" if self.layers == "te" else "megatron-local"
        tp = f"tp {self.tp}{' (sequence parallel)' if self.sequence_parallel else ''} x dp {self.dp}"
        return (f"backend {backend[self.backend]} | layers {layers} | attention {self.attention} | {tp} | "
                f"dtype {dtype} | recompute {self.recompute} | compile {'on' if self.compile else 'off'} | "
                f"device {self.device}")


def default_device() -> torch.device:
    """This rank's GPU (init_distributed set it from LOCAL_RANK), or the CPU."""
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def resolve(parallel: ParallelConfig, dtype: str = "auto", *, world_size: int | None = None,
            device: str | torch.device | None = None, training: bool = True) -> Plan:
    """Resolve every `auto` of `parallel` and `dtype` (train.dtype) for `device` (default: this
    rank's GPU, or the CPU) and `world_size` ranks (default: one TP group). `training`: an
    optimizer will be built. A combination that cannot run raises ConfigError naming the key."""
    device = torch.device(device) if device is not None else default_device()
    on_gpu = device.type == "cuda"
    backend = None
    if training:
        backend = parallel.backend if parallel.backend != "auto" else "megatron" if on_gpu else "torch"
        if backend == "megatron" and not on_gpu:
            raise ConfigError("invalid config: parallel.backend=megatron needs a GPU (megatron DDP/"
                              "DistributedOptimizer allocate on CUDA); use parallel.backend=torch or auto on CPU")
    sequence_parallel = parallel.sequence_parallel and parallel.tp > 1
    te_available = on_gpu and transformer_engine_available()
    if parallel.layers == "te" and not te_available:
        raise ConfigError("invalid config: parallel.layers=te needs Transformer Engine on a GPU "
                          "(`pip install -e .[gpu]`); use parallel.layers=local or auto")
    # Sequence parallelism splits the MMDiT's token dim; TE's linears split dim 0 of [S, B, D]
    # (config/parallel.py rejects layers=te with it), so `auto` takes the local ones then.
    use_te = parallel.layers == "te" or (parallel.layers == "auto" and te_available and not sequence_parallel)
    try:
        attention = resolve_attention(parallel.attention)
    except ValueError as e:
        raise ConfigError(f"invalid config: {e}") from None
    compute = resolve_dtype(dtype, device.type)
    params = torch.float32 if backend == "torch" else compute
    return Plan(device=device, compute_dtype=compute, params_dtype=params, autocast=params != compute,
                layers="te" if use_te else "local", attention=attention, sequence_parallel=sequence_parallel,
                recompute=parallel.recompute, recompute_every=parallel.recompute_every, compile=parallel.compile,
                backend=backend, tp=parallel.tp, dp=(world_size or parallel.tp) // parallel.tp)


@dataclass
class Parallelized:
    """A built model and what goes with it; what an objective's `setup` receives."""

    model: MMDiT
    """This rank's shard, unwrapped (recompute set, blocks compiled)."""
    backend: TorchBackend | MegatronBackend | None
    """Data parallelism and the optimizer around `model`; None when no optimizer was asked for."""
    plan: Plan
    dims: ParallelDims
    lora: bool = False
    """`model` trains LoRA adapters on a frozen base (train.lora): `mmdit.model.lora.disabled(model)`
    runs the base, so a DPO/GRPO reference needs no second model."""


def parallelize(args: MMDiTArgs, parallel: ParallelConfig, *, dtype: str = "auto",
                optimizer: OptimizerConfig | None = None, seed: int | None = None,
                weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                lora: LoraConfig | None = None) -> Parallelized:
    """Build this rank's shard of the MMDiT as `parallel` asks and return it with its `Plan`.

    Weights: loaded from `weights` (an mmdit checkpoint or a diffusers transformer dir), else
    drawn by `init_weights(seed)`, else left uninitialized for the caller to load. `optimizer`
    None builds no backend (sampling, evaluation, a frozen reference model). `lora` (enabled):
    freeze the weights, keep them in the compute dtype, and add adapters (model/lora.py) in the
    parameter dtype, which are all the optimizer and the checkpoints see. Joins the process
    groups first when the caller has not (init_parallel).
    """
    dims = init_parallel(parallel.tp)
    plan = resolve(parallel, dtype, world_size=dims.world_size, device=device, training=optimizer is not None)
    log.info(plan.describe())
    model = build_mmdit(args, tp_group(), device=plan.device, use_te=plan.layers == "te",
                        params_dtype=plan.params_dtype, attention=plan.attention,
                        sequence_parallel=plan.sequence_parallel)
    if weights:
        from mmdit.model.checkpoint import load_weights

        load_weights(model, weights)
    elif seed is not None:
        from mmdit.model.init import init_weights

        init_weights(model, seed)
    model.to(plan.params_dtype)  # the layers outside the parallel linears are built in fp32
    if lora is not None and lora.enabled:
        _apply_lora(model, lora, plan, seed, weights)
        if lora.dropout:
            # The ranks of a TP group draw the same dropout masks (a replicated input must be
            # dropped alike on each, or the replicated A would drift apart), as megatron seeds
            # its default generator per DP rank; recompute replays the generator's state.
            torch.manual_seed((seed or 0) * 100_003 + dims.dp_rank)
    apply_recompute(model, plan.recompute, plan.recompute_every)
    if plan.compile:
        compile_blocks(model)  # checkpointing wraps the compiled blocks
    backend = None
    if optimizer is not None:
        backend = build_backend(model, plan.backend, optimizer, tp_group(), dp_group())
    return Parallelized(model=model, backend=backend, plan=plan, dims=dims, lora=bool(lora and lora.enabled))


def _apply_lora(model: MMDiT, lora: LoraConfig, plan: Plan, seed: int | None, weights) -> None:
    from mmdit.model.checkpoint import import_lora
    from mmdit.model.lora import apply_lora
    from mmdit.model.mmdit import mark_tensor_parallel_params

    model.to(plan.compute_dtype)  # frozen: bf16 on GPU, with no fp32 copy anywhere
    adapted = apply_lora(model, lora, seed or 0, dtype=plan.params_dtype)
    model.lora_info["base"] = str(weights or "")
    if lora.init_from:
        missing = import_lora(model, lora.init_from, lora.scale)
        if missing:
            log.warning("LoRA %s has no weights for %d adapter tensors (e.g. %s): they start as initialized",
                        lora.init_from, len(missing), missing[0])
    mark_tensor_parallel_params(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d (scale %g) on %d linears: %d trained parameters on this rank, base frozen",
             lora.rank, lora.scale, len(adapted), trained)
