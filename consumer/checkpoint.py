"""The training checkpoint: one format, every file of it named here.

    run.dir/checkpoints/
      latest                              name of the newest complete checkpoint (moved last)
      step_00000020/
        model/                            the weights: an mmdit model checkpoint (model/checkpoint.py)
          mmdit.json                        format, model args, TP size, split dim per parameter
          model-tp00-of-02.safetensors      TP rank 0's slices (diffusers names); any TP size loads them
          model-tp01-of-02.safetensors
        optimizer/                        optimizer state per TP rank (same TP size to resume)
          tp00.pt                           torch backend: full AdamW state of TP rank 0's shard
          tp00-params.pt, tp00-groups.pt    megatron backend: fp32 main weights + Adam moments, groups
        data.json                         the data cursor and the data-config (mixture) history
        trainer.json                      step, seed, TP/DP layout, backend; written last

`trainer.json` is written after every rank wrote its files (a gloo barrier), and `latest` moves
after it, so a job killed mid-save resumes from the previous checkpoint, never a partial one.
Every file is published atomically (`utils/atomic.py`).

`mmdit consume` (a trainer without a model) keeps the same `data.json` content per DP rank in
`run.dir/consume_state_dp<r>.json`, with its step, through `write_data_state`/`read_data_state`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from mmdit.model.checkpoint import load_model, write_model_index, write_model_shard
from mmdit.parallel.state import barrier
from mmdit.utils.atomic import atomic_write_json, atomic_write_text

CHECKPOINTS, LATEST = "checkpoints", "latest"
MODEL, OPTIMIZER, DATA, TRAINER = "model", "optimizer", "data.json", "trainer.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def optimizer_file(path: Path, tp_rank: int, part: str = "") -> Path:
    """One optimizer file of TP rank `tp_rank` (`part` names the backend's pieces)."""
    return path / OPTIMIZER / f"tp{tp_rank:02d}{'-' + part if part else ''}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / TRAINER).is_file() else None


def save_checkpoint(run_dir: Path, step: int, model, backend, dims, data_state: dict, trainer_state: dict) -> Path:
    """Collective over all ranks. Barriers are gloo (`parallel.state.barrier`): an NCCL barrier
    next to the data service's RPC threads can deadlock."""
    path = checkpoint_dir(run_dir, step)
    (path / OPTIMIZER).mkdir(parents=True, exist_ok=True)
    if dims.dp_rank == 0:
        write_model_shard(model, path / MODEL)
    backend.save_optimizer(lambda part: optimizer_file(path, dims.tp_rank, part), dims.dp_rank)  # collective over DP
    barrier()
    if dist.get_rank() == 0:
        write_model_index(model, path / MODEL)
        atomic_write_json(path / DATA, data_state)
        atomic_write_json(path / TRAINER, {**trainer_state, "step": step, "tp": dims.tp, "dp": dims.dp,
                                           "backend": backend.name})
        atomic_write_text(path.parent / LATEST, path.name)
    barrier()
    return path


def load_checkpoint(path: Path, model, backend, dims) -> tuple[dict, dict]:
    """Load model (any TP size) and optimizer (same TP size) state; return (trainer state, data state)."""
    state = json.loads((path / TRAINER).read_text())
    load_model(model, path / MODEL)
    if state["tp"] != dims.tp:
        raise ValueError(f"{path} was saved at TP={state['tp']}; its optimizer state cannot resume at "
                         f"TP={dims.tp}. Start from its weights instead (train.init_from={path / MODEL}).")
    if state["backend"] != backend.name:
        raise ValueError(f"{path} holds {state['backend']} optimizer state; this run uses {backend.name}")
    backend.load_optimizer(lambda part: optimizer_file(path, dims.tp_rank, part), dims.dp_rank)
    data = json.loads((path / DATA).read_text()) if (path / DATA).is_file() else {}
    return state, data


# ----------------------------------------------------------------------------- `mmdit consume`


def data_state_file(run_dir: Path, dp_rank: int) -> Path:
    return Path(run_dir) / f"consume_state_dp{dp_rank}.json"


def write_data_state(run_dir: Path, dp_rank: int, step: int, data_state: dict) -> None:
    atomic_write_json(data_state_file(run_dir, dp_rank), {"step": step, "data": data_state})


def read_data_state(run_dir: Path, dp_rank: int) -> tuple[int, dict]:
    """(steps done, data state) of DP rank `dp_rank`; (0, {}) when it never saved."""
    path = data_state_file(run_dir, dp_rank)
    if not path.is_file():
        return 0, {}
    saved = json.loads(path.read_text())
    return int(saved["step"]), saved.get("data", {})
