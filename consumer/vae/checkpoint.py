"""The decoder fine-tune's checkpoint: the run-dir conventions of consumer/checkpoint.py, its own files.

    run.dir/checkpoints/
      latest                       name of the newest complete checkpoint (moved last)
      step_00000200/
        decoder.safetensors        post_quant_conv.* and decoder.* (fp32), the VAE's own names
        optimizer.safetensors      AdamW's exp_avg / exp_avg_sq per parameter (`<name>.exp_avg`)
        data.json                  the data cursor (the step: crops are a function of it) and the
                                   pools' identities
        trainer.json               kind "vae_decoder", step, seed, DP size, backend, the base VAE and
                                   its encoder-half identity, the size and CRC-32 of every other
                                   file, sealed with a checksum of its own content; written last

Data parallelism replicates the decoder and the optimizer (DDP), so rank 0 writes everything while
the others wait. Resume takes the newest checkpoint whose trainer.json and files verify, as the
MMDiT's does, and refuses one made from another base VAE (its encoder half differs).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from mmdit.consumer.checkpoint import (
    DATA,
    FILES,
    LATEST,
    SEAL,
    TRAINER,
    CheckpointError,
    checkpoint_dir,
    checkpoints,
    read_trainer_state,
)
from mmdit.consumer.checkpoint import _seal as seal_of  # the one sealing rule trainer.json is read with
from mmdit.utils.atomic import atomic_save_safetensors, atomic_write_json, atomic_write_text
from mmdit.utils.checksum import ALGORITHM, file_checksum, recording_checksums

log = logging.getLogger("mmdit.vae")

KIND = "vae_decoder"
DECODER, OPTIMIZER = "decoder.safetensors", "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def save(run_dir: Path, step: int, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
         data_state: dict, trainer_state: dict) -> Path:
    """Write checkpoint `step` (rank 0) and move `latest` to it; CheckpointError if not written
    (the partial directory is removed; `latest` stays)."""
    bad = sum(int((~p.detach().isfinite()).sum()) for p in params.values())
    if bad:
        raise CheckpointError(f"step {step}: the decoder holds {bad} non-finite values; not saving a checkpoint")
    path = checkpoint_dir(run_dir, step)
    path.mkdir(parents=True, exist_ok=True)
    try:
        with recording_checksums() as written:
            atomic_save_safetensors({n: p.detach().float() for n, p in params.items()}, path / DECODER)
            atomic_save_safetensors(optimizer_tensors(params, optimizer), path / OPTIMIZER)
            atomic_write_json(path / DATA, data_state)
        files = {p.relative_to(path).as_posix(): {"bytes": size, ALGORITHM: crc} for p, (size, crc) in written.items()}
        state = {**trainer_state, "kind": KIND, "step": step, "tp": 1, FILES: files}
        atomic_write_json(path / TRAINER, {**state, SEAL: seal_of(state)})
        atomic_write_text(path.parent / LATEST, path.name)
    except OSError as e:
        shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"checkpoint of step {step} not written: {e}") from e
    return path


def optimizer_tensors(params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    out = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        for moment in MOMENTS:
            if moment in state:
                out[f"{name}.{moment}"] = state[moment].detach().float()
    return out


def problems(path: Path) -> list[str]:
    """What is wrong with the checkpoint at `path` ("<file>: <why>"); [] when it is whole."""
    try:
        state = read_trainer_state(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{TRAINER}: {'missing' if isinstance(e, FileNotFoundError) else e}"]
    if state.get("kind") != KIND:
        return [f"{TRAINER}: a {state.get('kind', 'MMDiT')!r} checkpoint, not a VAE decoder's"]
    out = []
    recorded = state.get(FILES, {})
    for name in (DECODER, OPTIMIZER, DATA):
        if name not in recorded:
            out.append(f"{name}: not recorded")
    for name, want in recorded.items():
        try:
            size, crc = file_checksum(path / name)
        except OSError as e:
            out.append(f"{name}: {'missing' if isinstance(e, FileNotFoundError) else e}")
            continue
        if (size, crc) != (want["bytes"], want[ALGORITHM]):
            out.append(f"{name}: {size} bytes {ALGORITHM} {crc}, {want['bytes']} bytes {want[ALGORITHM]} written")
    return out


def newest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; None when there is none. CheckpointError when some
    exist but none verifies (never a silent fresh start)."""
    rejected = []
    for path in checkpoints(run_dir):
        why = problems(path)
        if not why:
            for bad, reason in rejected:
                log.warning("not resuming from %s: %s", bad.name, reason)
            return path
        rejected.append((path, "; ".join(why)))
    if rejected:
        raise CheckpointError("no checkpoint in " + str(Path(run_dir) / "checkpoints") + " can be resumed from: "
                              + "; ".join(f"{p.name}: {why}" for p, why in rejected)
                              + " (move them away or set vae.resume=false to start over)")
    return None


def load(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Load the decoder and the optimizer state into place; (trainer state, data state)."""
    from safetensors.torch import load_file

    state = json.loads((path / TRAINER).read_text())
    weights = load_file(str(path / DECODER))
    if set(weights) != set(params):
        raise CheckpointError(f"{path / DECODER} holds other parameters than this VAE's decoder "
                              f"({len(weights)} vs {len(params)})")
    moments = load_file(str(path / OPTIMIZER))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
            if f"{name}.exp_avg" in moments:
                optimizer.state[p] = {"step": torch.tensor(float(state["optimizer_steps"])),
                                      **{m: moments[f"{name}.{m}"].to(p.device) for m in MOMENTS}}
    return state, json.loads((path / DATA).read_text())


def prune(run_dir: Path, keep: int) -> None:
    """Delete complete checkpoints beyond the newest `keep` (0: keep all), and killed saves."""
    complete = [p for p in checkpoints(run_dir) if (p / TRAINER).is_file()]
    doomed = (complete[keep:] if keep > 0 else []) + [p for p in checkpoints(run_dir) if not (p / TRAINER).is_file()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
