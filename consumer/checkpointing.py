"""Training checkpoints: model (reshardable), optimizer, and the trainer/data state.

    run.dir/checkpoints/step_00000020/model/          mmdit model checkpoint (any TP can load it)
    run.dir/checkpoints/step_00000020/optimizer/tp00.pt  full optimizer state of TP rank 0's shard
    run.dir/checkpoints/step_00000020/trainer.json    step, data cursor, parallel layout, config
    run.dir/checkpoints/latest                        name of the newest complete checkpoint

`latest` is replaced atomically after every rank has written, so a job killed mid-save resumes
from the previous checkpoint, never from a partial one.
"""

import json
import os
from pathlib import Path

import torch.distributed as dist

from mmdit.model.checkpoint import load_model, write_model_index, write_model_shard
from mmdit.parallel.state import barrier


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, step: int, model, backend, dims, trainer_state: dict) -> Path:
    """Collective over all ranks. Barriers are gloo (`parallel.state.barrier`): an NCCL barrier
    next to the data service's RPC threads can deadlock."""
    path = checkpoint_dir(run_dir, step)
    (path / "optimizer").mkdir(parents=True, exist_ok=True)
    if dims.dp_rank == 0:
        write_model_shard(model, path / "model")
    backend.save_optimizer(path / "optimizer", dims.tp_rank, dims.dp_rank)  # collective over DP
    barrier()
    if dist.get_rank() == 0:
        write_model_index(model, path / "model")
        state = {**trainer_state, "step": step, "tp": dims.tp, "dp": dims.dp, "backend": backend.name}
        _atomic_write(path / "trainer.json", json.dumps(state, indent=1))
        _atomic_write(run_dir / "checkpoints" / "latest", path.name)
    barrier()
    return path


def load_checkpoint(path: Path, model, backend, dims) -> dict:
    """Load model (any TP size) and optimizer (same TP size) state; return the trainer state."""
    state = json.loads((path / "trainer.json").read_text())
    load_model(model, path / "model")
    if state["tp"] != dims.tp:
        raise ValueError(f"{path} was saved at TP={state['tp']}; its optimizer state cannot resume at "
                         f"TP={dims.tp}. Start from its weights instead (train.init_from={path / 'model'}).")
    if state["backend"] != backend.name:
        raise ValueError(f"{path} holds {state['backend']} optimizer state; this run uses {backend.name}")
    backend.load_optimizer(path / "optimizer", dims.tp_rank, dims.dp_rank)
    return state
