"""EMA weights (train.ema_decay): an exponential moving average of the trained parameters, kept
where the optimizer keeps its state.

    ema <- decay * ema + (1 - decay) * w        in fp32, after every optimizer step that updated w

It starts as the weights training starts from (init_weights or checkpoint.init_from) and covers
the parameters the optimizer trains (with LoRA: the adapters only).

Ownership follows the optimizer's (parallel/backend.py): each TP rank keeps its slices, and each
DP rank the part of them whose optimizer state it owns. ZeRO-1 (torch backend) deals out whole
parameters, so a DP rank averages the parameters its partition holds; megatron's distributed
optimizer owns a flat range of each parameter, and a DP rank averages its fp32 main weights over
that range. So the EMA costs 4 bytes x parameters / (TP x DP) per rank and no communication.

On disk it is one more part of a training checkpoint, in parallel/optimizer_state.py's format
(any TP x DP layout reads it back exactly, resharded as the optimizer state is):

    step_N/ema/
      ema.json                   format, decay, updates, the TP x DP layout, each parameter's
                                 full shape and split dim (readable without a model: convert)
      tp00-dp00.safetensors      "ema/<name>": the flat range that rank owns; metadata: ranges

`weights=ema` uses it: `load_ema` puts it into a model of any TP size (mmdit sample, the evaluator,
mmdit eval), `full_ema_tensors` gives it unsharded (convert to-diffusers), and
`EMA.weights_in` swaps it into the live model for the trainer's own evaluations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmdit.parallel.optimizer_state import OwnedRange, ParamLayout, RankState, StateReader, param_layouts
from mmdit.parallel.staging import InPlace
from mmdit.utils.atomic import atomic_write_json

log = logging.getLogger("mmdit.ema")

EMA_DIR, INDEX, FORMAT, KEY = "ema", "ema.json", "mmdit-ema/1", "ema"
WEIGHTS = ("raw", "ema")
"""What `weights=` may name: the trained weights as they are, or their EMA."""


def owned_parameters(backend) -> Iterator[tuple[str, torch.nn.Parameter, OwnedRange, torch.Tensor]]:
    """(name, parameter, the range of its TP-local tensor this rank owns, the flat tensor over that
    range the optimizer writes): the fp32 main weights of megatron's distributed optimizer, the
    parameter itself under ZeRO-1. Read afresh each time, as loading the optimizer may replace them."""
    names = {p: n for n, p in backend.module.named_parameters()}
    if hasattr(backend, "_owned"):  # megatron: a flat range of each parameter
        for param, owned, opt in backend._owned():
            yield names[param], param, owned, opt._get_main_param_and_optimizer_states(param)["param"].view(-1)
        return
    for group in backend.optimizer.optim.param_groups:  # ZeroRedundancyOptimizer: this rank's partition
        for p in group["params"]:
            yield names[p], p, OwnedRange(0, p.numel()), p.detach().view(-1)


@dataclass
class StagedEma:
    """This rank's EMA as a checkpoint takes it; `write` needs no collective (the async writer)."""

    rank: RankState
    index: dict | None
    """ema.json, on global rank 0 only."""

    def write(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.rank.write(directory)
        if self.index is not None:
            atomic_write_json(directory / INDEX, self.index)


class EMA:
    """The EMA of the parameters this rank owns the optimizer state of (see the module doc)."""

    def __init__(self, backend, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1), got {decay}")
        self.backend, self.decay, self.updates = backend, decay, 0
        self.values: dict[str, torch.Tensor] = {}
        self.ranges: dict[str, OwnedRange] = {}
        self.reset()
        trained = {name for name, p in backend.module.named_parameters() if p.requires_grad}
        self.layouts = {n: layout for n, layout in param_layouts(backend.module).items() if n in trained}
        log.info("EMA of %d trained parameters (decay %g): %d owned here, %.1f MiB fp32", len(trained), decay,
                 len(self.values), sum(v.numel() for v in self.values.values()) * 4 / 2**20)

    @torch.no_grad()
    def reset(self) -> None:
        """The EMA of the weights as they are now (the start of training)."""
        for name, _, owned, source in owned_parameters(self.backend):
            self.values[name] = source.detach().float().clone()
            self.ranges[name] = owned

    @torch.no_grad()
    def update(self) -> None:
        """ema += (1 - decay) (w - ema): after an optimizer step that updated the weights."""
        names, sources = [], []
        for name, _, _, source in owned_parameters(self.backend):
            names.append(name)
            sources.append(source.float() if source.dtype != torch.float32 else source)
        if names:
            torch._foreach_lerp_([self.values[n] for n in names], sources, 1.0 - self.decay)
        self.updates += 1

    def state(self, dims, staging: InPlace) -> StagedEma:
        """This rank's part of a checkpoint, each tensor through `staging` (host copies for an
        asynchronous save)."""
        states = {name: {KEY: staging.copy(f"ema/{name}", t)} for name, t in self.values.items()}
        index = None
        if dims.tp_rank == 0 and dims.dp_rank == 0:
            index = {"format": FORMAT, "decay": self.decay, "updates": self.updates, "tp": dims.tp, "dp": dims.dp,
                     "params": {n: {"shape": list(lay.shape), "dim": lay.dim} for n, lay in self.layouts.items()}}
        return StagedEma(RankState(states, dict(self.ranges), dims.tp, dims.dp, dims.tp_rank, dims.dp_rank), index)

    @torch.no_grad()
    def load(self, directory: Path, dims) -> bool:
        """The saved EMA of what this rank owns now, from any TP x DP layout; False (the EMA starts
        from the weights just loaded) when the checkpoint has none (saved with train.ema_decay=0).
        Call it after the model and optimizer state are loaded."""
        if not (Path(directory) / INDEX).is_file():
            log.warning("%s holds no EMA weights (saved with train.ema_decay=0): the EMA starts from the "
                        "resumed weights", Path(directory).parent)
            self.reset()
            return False
        reader, index = ema_reader(directory)
        for name, owned in self.ranges.items():
            self.values[name].copy_(reader.read(name, KEY, dims.tp, dims.tp_rank, owned))
        self.updates = int(index.get("updates", 0))
        if index["decay"] != self.decay:
            log.warning("EMA saved with decay %g continues with train.ema_decay=%g", index["decay"], self.decay)
        return True

    @contextlib.contextmanager
    def weights_in(self, module, dp_group=None) -> Iterator[None]:
        """The EMA in place of the trained weights inside the block (the trainer's evaluations),
        the trained weights back after it. Each DP rank contributes what it owns (a sum over the
        DP group), so every rank holds its TP slices of the whole EMA. Collective over DP."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            saved = {n: params[n].detach().clone() for n in self.layouts}
            for name in self.layouts:
                p = params[name]
                full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                if name in self.values:
                    r = self.ranges[name]
                    full[r.start:r.end] = self.values[name]
                if dp_group is not None and dist.get_world_size(dp_group) > 1:
                    dist.all_reduce(full, group=dp_group)
                p.copy_(full.view_as(p))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, raw in saved.items():
                    params[name].copy_(raw)


def ema_reader(directory: Path) -> tuple[StateReader, dict]:
    """A reader of a checkpoint's EMA (its ema/ directory) and its index."""
    directory = Path(directory)
    index = json.loads((directory / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{directory}: unsupported EMA format {index.get('format')!r}")
    layouts = {n: ParamLayout(tuple(p["shape"]), p["dim"]) for n, p in index["params"].items()}
    return StateReader(directory, index["tp"], index["dp"], layouts), index


def ema_dir_of(model_dir: Path) -> Path:
    """The EMA beside a training checkpoint's model/ directory; FileNotFoundError when it has none."""
    found = Path(model_dir).parent / EMA_DIR
    if not (found / INDEX).is_file():
        raise FileNotFoundError(f"{Path(model_dir).parent} holds no EMA weights (ema/{INDEX}): weights=ema needs "
                                "a training checkpoint of a run with train.ema_decay > 0")
    return found


@torch.no_grad()
def load_ema(model, directory: Path) -> int:
    """Put a checkpoint's EMA into `model` (this rank's shard at its TP size), in place of the
    weights it averages; the others stay. Returns how many parameters it replaced."""
    reader, index = ema_reader(directory)
    params = dict(model.named_parameters())
    missing = sorted(set(index["params"]) - set(params))
    if missing:
        raise ValueError(f"{directory}: the EMA averages parameters this model lacks ({', '.join(missing[:4])}); "
                         "an EMA of LoRA adapters loads into the LoRA model it was trained with")
    for name in index["params"]:
        p = params[name]
        p.copy_(reader.read(name, KEY, model.tp_size, model.tp_rank, OwnedRange(0, p.numel())).view_as(p))
    return len(index["params"])


def full_ema_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The whole EMA, unsharded, fp32, under the model's own parameter names."""
    reader, index = ema_reader(directory)
    full = {}
    for name, p in index["params"].items():
        n = math.prod(p["shape"])
        full[name] = reader.read(name, KEY, 1, 0, OwnedRange(0, n)).view(p["shape"])
    return full
