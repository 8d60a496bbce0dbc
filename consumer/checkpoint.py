"""The training checkpoint: one format, every file of it named here.

    run.dir/checkpoints/
      latest                              name of the newest complete checkpoint (moved last)
      step_00000020/
        model/                            the weights: an mmdit model checkpoint (model/checkpoint.py)
          mmdit.json                        format, model args, TP size, split dim per parameter
          model-tp00-of-02.safetensors      TP rank 0's slices (diffusers names); any TP size loads them
          model-tp01-of-02.safetensors
        optimizer/                        optimizer state, one file per rank, no gather (parallel/optimizer_state.py)
          tp00-dp00.safetensors             the Adam moments (megatron: and fp32 main weights) that rank
          ...                               owns; any TP x DP layout resumes from them
          groups.pt                         megatron backend: its param-group state
        data.json                         the data cursor and the data-config (mixture) history
        trainer.json                      step, seed, TP/DP layout, backend; written last

`trainer.json` is written after every rank wrote its files (a gloo barrier), and `latest` moves
after it, so a job killed mid-save resumes from the previous checkpoint, never a partial one.
Every file is published atomically (`utils/atomic.py`).

Resume takes the newest checkpoint that verifies completely (`verify_checkpoint`: every file
present, JSON parseable, safetensors headers whole and file sizes what they promise, optimizer
archives intact), logging why it passed over newer ones; when checkpoints exist but none
verifies, it stops rather than start over. After each save, checkpoints beyond the newest
`train.keep_checkpoints` are deleted, except every `train.keep_every`-th step.

`mmdit consume` (a trainer without a model) keeps the same `data.json` content per DP rank in
`run.dir/consume_state_dp<r>.json`, with its step, through `write_data_state`/`read_data_state`.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

import torch.distributed as dist

from mmdit.model.checkpoint import load_model, write_model_index, write_model_shard
from mmdit.parallel.backend import MEGATRON_GROUPS
from mmdit.parallel.optimizer_state import StateReader, param_layouts, state_file
from mmdit.parallel.state import all_ranks_true
from mmdit.utils.atomic import DiskFullError, atomic_write_json, atomic_write_text
from mmdit.utils.safetensors_header import data_end, read_header

log = logging.getLogger("mmdit.checkpoint")

CHECKPOINTS, LATEST = "checkpoints", "latest"
MODEL, OPTIMIZER, DATA, TRAINER = "model", "optimizer", "data.json", "trainer.json"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be resumed from; the message says why for each."""


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def checkpoints(run_dir: Path) -> list[Path]:
    """Every step_N directory, newest first (complete or not)."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(found, key=step_of, reverse=True)


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte it promises (a truncated copy does not)."""
    try:
        header, start, size = read_header(path)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    if data_end(header, start) > size:
        raise ValueError(f"{path.name}: truncated ({size} of {data_end(header, start)} bytes)")


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete and intact, else what is wrong with it."""
    from mmdit.model.checkpoint import read_index

    try:
        trainer = json.loads((path / TRAINER).read_text())
        if step_of(path) != trainer["step"]:
            return f"{TRAINER} says step {trainer['step']}"
        json.loads((path / DATA).read_text())
        index = read_index(path / MODEL)
        for name in index["files"]:
            _check_safetensors(path / MODEL / name)
        for tp_rank in range(trainer["tp"]):
            for dp_rank in range(trainer["dp"]):
                _check_safetensors(state_file(path / OPTIMIZER, tp_rank, dp_rank))
        if trainer["backend"].startswith("megatron"):
            with zipfile.ZipFile(path / OPTIMIZER / MEGATRON_GROUPS) as archive:  # reads the end record
                archive.namelist()
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        return f"{type(e).__name__}: {e}"
    return None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; None when there is none at all. Raises
    CheckpointError when checkpoints exist but none verifies (never a silent fresh start)."""
    rejected = []
    for path in checkpoints(run_dir):
        why = verify_checkpoint(path)
        if why is None:
            for bad, reason in rejected:
                log.warning("not resuming from %s: %s", bad, reason)
            if rejected:
                log.warning("resuming from %s, the newest complete checkpoint", path)
            return path
        rejected.append((path, why))
    if rejected:
        raise CheckpointError("no checkpoint in " + str(Path(run_dir) / CHECKPOINTS) + " can be resumed from: "
                              + "; ".join(f"{p.name}: {why}" for p, why in rejected)
                              + " (move them away or set train.resume=false to start over)")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, if complete (a quick look; resume uses `resume_checkpoint`)."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / TRAINER).is_file() else None


def prune_checkpoints(run_dir: Path, keep: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (0: keep all), except steps that are
    multiples of `keep_every`; and what killed saves left (incomplete directories, temp files).
    Rank 0 only, while no save runs."""
    from mmdit.utils.atomic import remove_stale_tmp

    remove_stale_tmp(Path(run_dir) / CHECKPOINTS, "**/.tmp-*")
    complete = [p for p in checkpoints(run_dir) if (p / TRAINER).is_file()]
    doomed = []
    if keep > 0:
        doomed += [p for p in complete[keep:] if not (keep_every and step_of(p) % keep_every == 0)]
    doomed += [p for p in checkpoints(run_dir) if not (p / TRAINER).is_file()]  # killed saves
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save_checkpoint(run_dir: Path, step: int, model, backend, dims, data_state: dict, trainer_state: dict) -> Path:
    """Collective over all ranks. Barriers are gloo (`parallel.state.barrier`): an NCCL barrier
    next to the data service's RPC threads can deadlock.

    Refuses (CheckpointError, on every rank) to save non-finite weights; a write that fails on
    any rank (a full disk: DiskFullError) fails on every rank, and the partial directory is
    removed, so `latest` and the previous checkpoint stay as they were."""
    bad = sum(int((~p.detach().isfinite()).sum()) for p in model.parameters())
    if not all_ranks_true(bad == 0):
        raise CheckpointError(f"step {step}: the model holds non-finite values ({bad} on rank {dist.get_rank()}); "
                              "not saving a checkpoint of it")
    path = checkpoint_dir(run_dir, step)
    error: Exception | None = None
    try:
        (path / OPTIMIZER).mkdir(parents=True, exist_ok=True)
        if dims.dp_rank == 0:
            write_model_shard(model, path / MODEL)
        backend.save_optimizer(path / OPTIMIZER, dims)
    except OSError as e:
        error = e
    if all_ranks_true(error is None) and dist.get_rank() == 0:
        try:
            write_model_index(model, path / MODEL)
            atomic_write_json(path / DATA, data_state)
            atomic_write_json(path / TRAINER, {**trainer_state, "step": step, "tp": dims.tp, "dp": dims.dp,
                                               "backend": backend.name})
            atomic_write_text(path.parent / LATEST, path.name)
        except OSError as e:
            error = e
    if not all_ranks_true(error is None):
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(error, DiskFullError):
            raise error
        raise CheckpointError(f"checkpoint of step {step} not written"
                              + (f": {error}" if error else " (another rank failed to write its part)"))
    return path


def load_checkpoint(path: Path, model, backend, dims) -> tuple[dict, dict]:
    """Load model and optimizer state, saved at any TP x DP layout; return (trainer state, data state)."""
    state = json.loads((path / TRAINER).read_text())
    load_model(model, path / MODEL)
    if state["backend"] != backend.name:
        raise ValueError(f"{path} holds {state['backend']} optimizer state; this run uses {backend.name}")
    backend.load_optimizer(StateReader(path / OPTIMIZER, state["tp"], state["dp"], param_layouts(model)), dims)
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
