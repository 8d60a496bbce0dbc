"""Run a function on N local processes forming one torch.distributed job (as torchrun would).

Used by `mmdit convert verify --tp N` and by the multi-rank tests: real processes, real gloo
collectives over loopback. Each rank's return value comes back to the caller.
"""

import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from mmdit.utils.processes import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # N ranks share few cores; oversubscription only slows gloo down
    result = fn(rank, *args)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    from mmdit.parallel.state import destroy_parallel

    destroy_parallel()


def spawn(fn, nprocs: int, *args) -> list:
    """Call fn(rank, *args) on nprocs fresh processes; return their results in rank order.

    fn must be importable (module level). A failing rank raises here with its traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_entry, args=(nprocs, free_port(), out_dir, fn, args), nprocs=nprocs,
                           join=True, start_method="spawn")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
