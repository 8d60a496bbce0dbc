"""Data parallelism and the optimizer: one interface, two backends.

- `megatron` (GPU): megatron-core DistributedDataParallel (contiguous grad buffers, overlapped
  reduce-scatter) + DistributedOptimizer (fp32 main weights and Adam state sharded over DP),
  with bf16 params.
- `torch` (CPU, or when asked): torch DDP over the DP group + ZeroRedundancyOptimizer(AdamW),
  which also shards optimizer state over DP. Megatron's DDP and optimizer allocate on CUDA, so
  this is the path a CPU run takes.

Which one runs is the plan's choice (parallel/parallelize.py: `auto` picks megatron on GPU and
torch on CPU; megatron without a GPU is an error rather than a silent fallback).
"""

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmdit.config.train import OptimizerConfig
from mmdit.parallel.optimizer_state import OwnedRange, RankState, StateReader
from mmdit.parallel.staging import InPlace

IN_PLACE = InPlace()

log = logging.getLogger(__name__)

MEGATRON_GROUPS = "groups.pt"
"""megatron's param-group state (hyperparameters, Adam step), next to the per-rank state files."""


def grad_norm_tp(params: list[torch.nn.Parameter], tp_group) -> torch.Tensor:
    """Global L2 norm of gradients: TP-split parameters count on every rank, replicated ones once."""
    split = sum((p.grad.float().square().sum() for p in params if p.grad is not None and p.tensor_model_parallel),
                torch.zeros(()))
    replicated = sum((p.grad.float().square().sum() for p in params
                      if p.grad is not None and not p.tensor_model_parallel), torch.zeros(()))
    if tp_group is not None and tp_group.size() > 1:
        dist.all_reduce(split, group=tp_group)
    return (split + replicated).sqrt()


@dataclass
class TorchBackend:
    """torch DDP + ZeroRedundancyOptimizer(AdamW) over the DP group."""

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    tp_group: object
    grad_clip: float
    name: str = "torch-ddp+zero1"

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self):
        """Backward without the DP all-reduce: the micro-batches of an accumulation before the last."""
        return self.model.no_sync()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        """Clip by the global grad norm, then step; (grad norm, stepped). Gradients are already
        DP-averaged by DDP, so every rank sees the same norm: a non-finite one (or `skip`, for a
        non-finite loss) skips the update on every rank alike."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = grad_norm_tp(params, self.tp_group).item()
        if skip or not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        if self.grad_clip > 0:
            scale = min(1.0, self.grad_clip / (norm + 1e-6))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        return norm, True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_state(self, dims, staging: InPlace = IN_PLACE) -> RankState:
        """This rank's own AdamW state (its ZeRO partition: whole parameters), no gather; each
        tensor through `staging` (a host copy for an asynchronous save)."""
        names = param_names(self.module)
        local = self.optimizer.optim
        states = {names[p]: {k: staging.copy(f"{names[p]}/{k}", st[k]) for k in ("exp_avg", "exp_avg_sq", "step")}
                  for p, st in local.state.items() if "exp_avg" in st}
        ranges = {name: OwnedRange(0, state["exp_avg"].numel()) for name, state in states.items()}
        return RankState(states, ranges, dims.tp, dims.dp, dims.tp_rank, dims.dp_rank)

    def save_optimizer(self, directory: Path, dims) -> None:
        self.optimizer_state(dims).write(directory)

    def load_optimizer(self, reader: StateReader, dims) -> None:
        """The state of the parameters this rank's partition holds now, from any TP x DP layout."""
        names = param_names(self.module)
        local = self.optimizer.optim
        for group in local.param_groups:
            for p in group["params"]:
                keys = reader.keys(names[p])
                if not keys:  # never stepped before the save
                    continue
                owned = OwnedRange(0, p.numel())
                state = {k: reader.read(names[p], k, dims.tp, dims.tp_rank, owned).view_as(p).to(p.device)
                         for k in keys}
                local.state[p] = {"step": reader.step(names[p]).clone(), **state}


@dataclass
class MegatronBackend:
    """megatron-core DDP + DistributedOptimizer (GPU)."""

    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: object
    name: str = "megatron-ddp+distributed-optimizer"

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def no_sync(self):
        return self.model.no_sync()

    def step(self, skip: bool = False) -> tuple[float, bool]:
        self.model.finish_grad_sync()
        if skip:
            self.optimizer.zero_grad()
            return float("nan"), False
        # megatron checks the gradients for NaN itself (check_for_nan_in_grad) and clips inside
        stepped, grad_norm, _ = self.optimizer.step()
        return (float(grad_norm) if grad_norm is not None else float("nan")), bool(stepped)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _owned(self):
        """(model param, its range in this rank's shard, the optimizer that holds it)."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for gbuf_range_maps in opt.gbuf_ranges:
                for per_bucket in gbuf_range_maps.values():
                    for gbuf_range_map in per_bucket:
                        for model_param, ranges in gbuf_range_map["param_map"].items():
                            yield model_param, OwnedRange(ranges["param"].start, ranges["param"].end), opt

    def optimizer_state(self, dims, staging: InPlace = IN_PLACE) -> RankState:
        """This rank's fp32 main-weight and Adam-moment shards (no gather); DP rank 0 also saves
        the param-group state (megatron's own, small: hyperparameters and the Adam step). Each
        tensor goes through `staging`: megatron's getter returns the live GPU tensors, which the
        next step updates in place, so an asynchronous save takes host copies of them here."""
        names = param_names(self.module)
        states, ranges = {}, {}
        for param, owned, opt in self._owned():
            tensors = opt._get_main_param_and_optimizer_states(param)
            name = names[param]  # the step is in the groups' state
            states[name] = {k: staging.copy(f"{name}/{k}", v) for k, v in tensors.items() if k != "step"}
            ranges[name] = owned
        extra = {}
        if dims.tp_rank == 0 and dims.dp_rank == 0:  # the same on every rank
            extra[MEGATRON_GROUPS] = staging.tree(self.optimizer.state_dict())
        return RankState(states, ranges, dims.tp, dims.dp, dims.tp_rank, dims.dp_rank, extra)

    def save_optimizer(self, directory: Path, dims) -> None:
        self.optimizer_state(dims).write(directory)

    def load_optimizer(self, reader: StateReader, dims) -> None:
        groups = torch.load(reader.directory / MEGATRON_GROUPS, weights_only=False)
        self.optimizer.load_state_dict(groups)  # allocates the states
        names = param_names(self.module)
        # Without TE/apex, megatron falls back to torch Adam, whose per-parameter state holds a
        # "step"; its load_state_dict sets one shared step tensor in every state. The steps leave
        # the states for the copy and come back as one tensor per state.
        inner = [getattr(o, "optimizer", o) for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        with steps_set_aside(inner):
            for param, owned, opt in self._owned():
                saved = {k: reader.read(names[param], k, dims.tp, dims.tp_rank, owned) for k in reader.keys(names[param])}
                zeros = torch.zeros(owned.end - owned.start)  # moments of a model saved before its first step
                opt._set_main_param_and_optimizer_states(param, {"exp_avg": zeros, "exp_avg_sq": zeros, **saved})


def param_names(module: torch.nn.Module) -> dict:
    """Parameter -> its name: how optimizer state files key what a rank owns."""
    return {p: n for n, p in module.named_parameters()}


@contextlib.contextmanager
def steps_set_aside(optimizers):
    """Take torch Adam's per-parameter "step" out of the optimizers' states for the duration, then
    put it back as a distinct tensor in every state (a shared one would advance once per parameter
    per iteration and wreck the bias correction)."""
    saved = []
    for opt in optimizers:
        for state in opt.state.values():
            if "step" in state:
                saved.append((state, state.pop("step")))
    try:
        yield
    finally:
        for state, step in saved:
            state["step"] = step.detach().clone() if isinstance(step, torch.Tensor) else step


def weight_decay_groups(model) -> tuple[list, list]:
    """(weight matrices, everything else): biases and norm weights (1-D) are not decayed, as in
    megatron's default `no_weight_decay_cond`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return decay, no_decay


def build_backend(model, name: str, optim: OptimizerConfig, tp_group, dp_group):
    """Wrap `model` for data parallelism and build its optimizer: `name` is the plan's backend
    (megatron | torch), resolved by parallel/parallelize.py."""
    if name == "megatron":
        return _build_megatron(model, optim)
    if name != "torch":
        raise ValueError(f"unknown backend {name!r}: megatron or torch")
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, process_group=dp_group)
    decay, no_decay = weight_decay_groups(model)
    optimizer = ZeroRedundancyOptimizer(decay, optimizer_class=torch.optim.AdamW, process_group=dp_group,
                                        lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                        weight_decay=optim.weight_decay)
    if no_decay:
        optimizer.add_param_group({"params": no_decay, "weight_decay": 0.0})
    return TorchBackend(model=ddp, module=model, optimizer=optimizer, tp_group=tp_group, grad_clip=optim.grad_clip)


def _build_megatron(model, optim: OptimizerConfig):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import distrib_optimizer, get_megatron_optimizer

    from mmdit.parallel import megatron_fallbacks

    if not distrib_optimizer.HAVE_APEX_OR_TE:
        megatron_fallbacks.install()  # gradient norm and clipping on the device, not one sync per parameter
        log.warning("megatron backend without Transformer Engine or apex: torch's AdamW (multi-tensor, not fused) "
                    "instead of the fused Adam; install transformer-engine (`pip install -e .[gpu]`) for full speed")

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                               use_distributed_optimizer=True, check_for_nan_in_grad=True)
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2, clip_grad=optim.grad_clip, bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=True),
        [ddp])
    return MegatronBackend(model=ddp, module=model, optimizer=optimizer)
