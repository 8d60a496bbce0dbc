"""Optimizer state on disk: one file per (TP rank, DP rank), written without any gather, read back
at any TP and DP size.

Both backends shard optimizer state over DP: ZeRO-1 hands whole parameters to ranks, megatron's
DistributedOptimizer a flat range of each parameter (bucket order). Either way a rank owns, per
parameter, a range [start, end) of that parameter's TP-local tensor flattened, and keeps state
tensors of that length (Adam's moments; megatron's fp32 main weights) plus a step count. A rank
writes exactly that, with its ranges in the file's metadata:

    optimizer/tp00-dp01.safetensors    "exp_avg/<name>", "exp_avg_sq/<name>", ["param/<name>"],
                                       "step/<name>" (0-dim); metadata: ranges, tp, dp

so a checkpoint costs each rank its own shard (megatron's `save_parameter_state` gathered a TP
shard's whole fp32 state to DP rank 0: ~12 bytes x parameters / TP in one process).

Reading takes, for each range a rank owns now, the overlapping pieces of the files of the same
TP rank (a different DP size only moves range boundaries). At another TP size the parameter's
TP-local tensors of every old TP rank are assembled, joined along its split dim and cut for the
new rank. safetensors slices are read lazily, so a rank reads little more than it owns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mmdit.utils.atomic import atomic_save_safetensors, atomic_torch_save


def state_file(directory: Path, tp_rank: int, dp_rank: int) -> Path:
    return Path(directory) / f"tp{tp_rank:02d}-dp{dp_rank:02d}.safetensors"


@dataclass(frozen=True)
class OwnedRange:
    """The part of one parameter a rank keeps optimizer state for: [start, end) of its TP-local
    tensor, flattened."""

    start: int
    end: int


def write_rank_state(path: Path, states: dict[str, dict[str, torch.Tensor]], ranges: dict[str, OwnedRange],
                     tp: int, dp: int) -> None:
    """`states[name][key]`: a flat tensor of the range's length, or a 0-dim one (`step`)."""
    tensors = {f"{key}/{name}": t.reshape(-1 if t.dim() else ()) for name, per_key in states.items()
               for key, t in per_key.items()}
    metadata = {"ranges": json.dumps({n: [r.start, r.end] for n, r in ranges.items()}), "tp": str(tp), "dp": str(dp)}
    atomic_save_safetensors(tensors, path, metadata)


@dataclass
class RankState:
    """One rank's optimizer state as `write_rank_state` takes it, taken at a step boundary (in
    host memory for an asynchronous save: parallel/staging.py), and what else its backend saves
    beside it (megatron's param-group state). `write` needs no collective: any thread may run it."""

    states: dict[str, dict[str, torch.Tensor]]
    ranges: dict[str, OwnedRange]
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    extra: dict[str, object] = field(default_factory=dict)
    """File name -> an object written beside the rank files with torch.save."""

    def write(self, directory: Path) -> None:
        write_rank_state(state_file(directory, self.tp_rank, self.dp_rank), self.states, self.ranges, self.tp, self.dp)
        for name, obj in self.extra.items():
            atomic_torch_save(obj, Path(directory) / name)


@dataclass(frozen=True)
class ParamLayout:
    shape: tuple[int, ...]  # the full (unsharded) shape
    dim: int | None  # split over TP along this dim; None = replicated

    def local_shape(self, tp: int) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.dim is not None:
            shape[self.dim] //= tp
        return tuple(shape)


def param_layouts(model) -> dict[str, ParamLayout]:
    from mmdit.model.sharding import full_shapes, partition_dims

    dims = partition_dims(model)
    return {name: ParamLayout(shape, dims[name]) for name, shape in full_shapes(model).items()}


class _RankFile:
    def __init__(self, path: Path):
        self.handle = safe_open(str(path), framework="pt")  # memory-mapped; slices read on demand
        meta = self.handle.metadata()
        self.ranges = {n: OwnedRange(*r) for n, r in json.loads(meta["ranges"]).items()}
        self.keys_of: dict[str, set[str]] = {}  # parameter name -> its state keys in this file
        for tensor_name in self.handle.keys():
            key, name = tensor_name.split("/", 1)
            self.keys_of.setdefault(name, set()).add(key)


class StateReader:
    """The optimizer state a checkpoint holds (written at TP=`tp`, DP=`dp`), cut for any layout."""

    def __init__(self, directory: Path, tp: int, dp: int, layouts: dict[str, ParamLayout]):
        self.directory, self.tp, self.dp, self.layouts = Path(directory), tp, dp, layouts
        self._opened: dict[int, list[_RankFile]] = {}

    def _files(self, tp_rank: int) -> list[_RankFile]:
        """The DP ranks' files of one old TP rank, opened when first needed."""
        if tp_rank not in self._opened:
            self._opened[tp_rank] = [_RankFile(state_file(self.directory, tp_rank, d)) for d in range(self.dp)]
        return self._opened[tp_rank]

    def step(self, name: str) -> torch.Tensor | None:
        for f in self._files(0):
            if "step" in f.keys_of.get(name, ()):
                return f.handle.get_tensor(f"step/{name}")
        return None

    def keys(self, name: str) -> set[str]:
        """The state keys saved for `name` (exp_avg, exp_avg_sq, maybe param; not step)."""
        return {k for f in self._files(0) for k in f.keys_of.get(name, ())} - {"step"}

    def read(self, name: str, key: str, tp: int, tp_rank: int, owned: OwnedRange) -> torch.Tensor:
        """State `key` of parameter `name` over `owned`, for TP rank `tp_rank` of a TP=`tp` layout."""
        layout = self.layouts[name]
        if tp == self.tp or layout.dim is None:
            return self._gather(self._files(tp_rank if tp == self.tp else 0), name, key, owned)
        numel = math.prod(layout.local_shape(self.tp))
        old = [self._gather(self._files(t), name, key, OwnedRange(0, numel)).view(layout.local_shape(self.tp))
               for t in range(self.tp)]
        new = torch.cat(old, dim=layout.dim).chunk(tp, dim=layout.dim)[tp_rank]
        return new.reshape(-1)[owned.start:owned.end].clone()

    @staticmethod
    def _gather(files: Iterable[_RankFile], name: str, key: str, owned: OwnedRange) -> torch.Tensor:
        """Assemble [owned.start, owned.end) from the pieces of the DP ranks' files."""
        out, covered = None, 0
        for f in files:
            have = f.ranges.get(name)
            if have is None:
                continue
            lo, hi = max(have.start, owned.start), min(have.end, owned.end)
            if lo >= hi:
                continue
            piece = f.handle.get_slice(f"{key}/{name}")[lo - have.start:hi - have.start]
            if out is None:
                out = torch.empty(owned.end - owned.start, dtype=piece.dtype)
            out[lo - owned.start:hi - owned.start] = piece
            covered += hi - lo
        if covered != owned.end - owned.start:
            raise KeyError(f"optimizer state {key}/{name}: the checkpoint covers {covered} of the "
                           f"{owned.end - owned.start} elements [{owned.start}, {owned.end})")
        return out
