"""Process groups: torch.distributed + megatron-core `parallel_state` (TP x DP).

Everything that builds a model goes through here, so a single CPU process, a torchrun job and a
meta-device size estimate all give the model a real tensor-parallel group.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mmdit.utils.store import join_process_group


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    tp: int

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()


def init_distributed(backend: str | None = None) -> None:
    """Join the job the environment describes (mmdit's local launcher, torchrun, SLURM), or form
    a one-process group."""
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        join_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def init_parallel(tp: int, backend: str | None = None) -> ParallelDims:
    """Initialize torch.distributed and megatron's TP x DP groups (DP = world / TP)."""
    init_distributed(backend)
    world = dist.get_world_size()
    if world % tp:
        raise ValueError(f"parallel.tp={tp} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError("model parallel groups already initialized with another TP size")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        global _GLOO_WORLD
        _GLOO_WORLD = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return ParallelDims(world_size=world, rank=dist.get_rank(), tp=tp)


_GLOO_WORLD = None


def barrier() -> None:
    """A barrier over all ranks on gloo: never an NCCL barrier next to RPC threads (deadlock)."""
    dist.barrier(group=_GLOO_WORLD)


def all_ranks_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank (a gloo all-reduce; also a barrier)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(t, group=_GLOO_WORLD)
    return int(t.item()) == 0


def any_rank_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on some rank."""
    return not all_ranks_true(not flag)


def all_gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank (gloo; also a barrier)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=_GLOO_WORLD)
    return gathered


def init_fake_parallel(tp: int) -> ParallelDims:
    """A one-process stand-in for rank 0 of a TP=tp job (torch's fake backend: no communication),
    to build one rank's shard on the meta device and count its parameters."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
    return ParallelDims(world_size=tp, rank=0, tp=tp)


def tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def dp_group():
    return parallel_state.get_data_parallel_group()


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
