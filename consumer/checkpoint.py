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
        ema/                              train.ema_decay > 0: the EMA weights, sharded like the optimizer
          ema.json                          state, in its format (parallel/ema.py); any TP x DP resumes
          tp00-dp00.safetensors             and reshards them
        data.json                         the data cursor and the data-config (mixture) history
        trainer.json                      step, seed, TP/DP layout, backend, the size and CRC-32 of
                                          every other file; written last
      rejected/step_00000024/             a newer checkpoint that resume passed over, set aside

`trainer.json` is written after every rank wrote its files (a gloo barrier), and `latest` moves
after it, so a job killed mid-save resumes from the previous checkpoint, never a partial one.
Every file is published atomically (`utils/atomic.py`).

Contents are checksummed (`utils/checksum.py`): each rank records the size and CRC-32 of every
file it publishes, from the bytes it just wrote (no second read of the weights from disk); rank
0 gathers them and lists every file in the directory under "files" in `trainer.json` (a file no
writer recorded, it reads itself: a new part of the checkpoint is covered without code here), and
seals `trainer.json` with a checksum of its own content.

Resume takes the newest checkpoint that verifies (`checkpoint_problems`): `trainer.json` whole,
every file present with its structure whole (JSON parseable, safetensors headers whole and sizes
what they promise, zip archives intact) and its size and checksum as recorded. Each rank checks a
share of the files, balanced by size, and the ranks pool what they found, so all take the same
checkpoint, logging why newer ones were passed over; when checkpoints exist but none verifies, it
stops rather than start over. Checkpoints saved before checksums were recorded are checked for
structure only (one warning). The trainer moves the checkpoints it passed over to
`checkpoints/rejected/`, so that retention never deletes the good one in their favour and no new
save lands in a damaged directory. After each save, checkpoints beyond the newest
`checkpoint.keep` are deleted, except every `checkpoint.keep_every`-th step.
`mmdit checkpoint verify` (launch/checkpoint_cli.py) runs the same checks by hand.

`mmdit consume` (a trainer without a model) keeps the same `data.json` content per DP rank in
`run.dir/consume_state_dp<r>.json`, with its step, through `write_data_state`/`read_data_state`.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

import torch
import torch.distributed as dist

from mmdit.model.checkpoint import FORMAT as MODEL_FORMAT
from mmdit.model.checkpoint import INDEX, checkpoint_tensors, load_model, read_index, shard_file, write_model_index
from mmdit.parallel.backend import MEGATRON_GROUPS
from mmdit.parallel.ema import EMA_DIR
from mmdit.parallel.optimizer_state import RankState, StateReader, param_layouts, state_file
from mmdit.parallel.staging import InPlace
from mmdit.utils.atomic import DiskFullError, atomic_save_safetensors, atomic_write_json, atomic_write_text, is_tmp
from mmdit.utils.checksum import ALGORITHM, crc32_hex, file_checksum, recording_checksums
from mmdit.utils.safetensors_header import data_end, read_header

# mmdit.parallel.state (megatron's parallel_state, seconds to import) is imported by the
# collective functions only, so `mmdit checkpoint verify` starts fast.

log = logging.getLogger("mmdit.checkpoint")

CHECKPOINTS, LATEST, REJECTED = "checkpoints", "latest", "rejected"
MODEL, OPTIMIZER, DATA, TRAINER = "model", "optimizer", "data.json", "trainer.json"
OBJECTIVE = "objective"
"""The objective's own state, one file per DP rank (GRPO: a rollout still to be trained on)."""
FILES, SEAL = "files", "checksum"  # trainer.json: every other file's size and checksum; its own


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


# ----------------------------------------------------------------------------- verification


def _seal(state: dict) -> str:
    """The checksum of trainer.json's content (every field but this one)."""
    body = {k: v for k, v in state.items() if k != SEAL}
    return f"{ALGORITHM}:{crc32_hex(json.dumps(body, sort_keys=True).encode())}"


def read_trainer_state(path: Path) -> dict:
    """The checkpoint's trainer.json; ValueError when it is not what the save wrote."""
    state = json.loads((path / TRAINER).read_text())
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    if SEAL in state and state[SEAL] != _seal(state):
        raise ValueError("checksum mismatch: its contents changed after the save")
    missing = [key for key in ("step", "tp", "dp", "backend") if key not in state]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    if state["step"] != step_of(path):
        raise ValueError(f"says step {state['step']}")
    files = state.get(FILES, {})
    if not (isinstance(files, dict) and all(isinstance(f, dict) and isinstance(f.get("bytes"), int)
                                            and isinstance(f.get(ALGORITHM), str) for f in files.values())):
        raise ValueError(f"its {FILES!r} are not sizes and {ALGORITHM} checksums")
    return state


def _required_files(path: Path, trainer: dict) -> list[str]:
    """The files the format requires, whether or not their checksums were recorded."""
    index = read_index(path / MODEL)
    names = [DATA, f"{MODEL}/{INDEX}", *(f"{MODEL}/{name}" for name in index["files"])]
    names += [state_file(Path(OPTIMIZER), t, d).as_posix() for t in range(trainer["tp"]) for d in range(trainer["dp"])]
    if trainer["backend"].startswith("megatron"):
        names.append(f"{OPTIMIZER}/{MEGATRON_GROUPS}")
    if trainer.get(OBJECTIVE):
        names += [objective_file(Path(OBJECTIVE), d).as_posix() for d in range(trainer["dp"])]
    return names


def objective_file(directory: Path, dp_rank: int) -> Path:
    return directory / f"dp{dp_rank:03d}.safetensors"


def _check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte it promises (a truncated copy does not)."""
    header, start, size = read_header(path)
    if data_end(header, start) > size:
        raise ValueError(f"truncated ({size} of {data_end(header, start)} bytes)")


def _check_structure(path: Path) -> None:
    """What can be checked without a checksum, by the kind of file."""
    if path.suffix == ".safetensors":
        _check_safetensors(path)
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".pt":  # torch.save's zip archive: reading the member list checks its end record
        with zipfile.ZipFile(path) as archive:
            archive.namelist()


def _why(e: Exception) -> str:
    return "missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"


def _check_file(ckpt: Path, name: str, recorded: dict | None) -> str | None:
    """What is wrong with one file of a checkpoint ("<name>: <why>"), or None."""
    path = ckpt / name
    try:
        stat = path.stat()
        if not S_ISREG(stat.st_mode):  # a pipe or device would block the reads or never end
            return f"{name}: not a regular file"
        size = stat.st_size
        if recorded is not None and size != recorded["bytes"]:
            return f"{name}: {size} bytes, {recorded['bytes']} written"
        _check_structure(path)
        if recorded is not None:
            crc = file_checksum(path)[1]
            if crc != recorded[ALGORITHM]:
                return (f"{name}: checksum mismatch ({ALGORITHM} {crc}, {recorded[ALGORITHM]} written): "
                        "its contents changed after the save")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        return f"{name}: {_why(e)}"
    return None


def _share(names: list[str], sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """Rank `rank`'s part of `names`: largest first, each to the least loaded rank so far (the
    same split on every rank, since every rank reads the same trainer.json)."""
    loads, mine = [(0, r) for r in range(world)], []
    for name in sorted(names, key=lambda n: (-sizes[n], n)):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(name)
        heapq.heappush(loads, (load + sizes[name] + 1, r))
    return mine


_warned_no_checksums = False


def _warn_no_checksums(path: Path) -> None:
    global _warned_no_checksums
    if not _warned_no_checksums:
        _warned_no_checksums = True
        log.warning("%s has no checksums (saved by an older mmdit): its files are checked for structure only, "
                    "not contents (so are other such checkpoints)", path)


def checkpoint_problems(path: Path, rank: int = 0, world: int = 1, only: str | None = None) -> list[str]:
    """What is wrong with the checkpoint at `path`, one "<file>: <why>" per damaged file; [] when
    it is complete and intact. trainer.json and the model index are read by every caller; of the
    other files only share `rank` of `world` (balanced by size) is checked, so ranks that pool
    their lists read each file once. `only="model/"`: the files under model/ alone (what the
    evaluator reads)."""
    try:
        trainer = read_trainer_state(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{TRAINER}: {_why(e)}"]
    recorded = trainer.get(FILES)
    if recorded is None and rank == 0:
        _warn_no_checksums(path)
    recorded, problems = recorded or {}, []
    try:
        required = _required_files(path, trainer)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # the other files still get checked
        required, problems = [], [f"{MODEL}/{INDEX}: {_why(e)}"]
    names = sorted((set(required) | set(recorded)) - ({f"{MODEL}/{INDEX}"} if problems else set()))
    names = [n for n in names if only is None or n.startswith(only)]
    sizes = {n: recorded[n]["bytes"] if n in recorded else 0 for n in names}
    mine = _share(names, sizes, rank, world)
    return problems + [why for name in mine if (why := _check_file(path, name, recorded.get(name)))]


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete and intact, else what is wrong with it
    (every file checked, in this process)."""
    return "; ".join(checkpoint_problems(path)) or None


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; None when there is none at all. Raises
    CheckpointError when checkpoints exist but none verifies (never a silent fresh start).

    Collective when torch.distributed is initialized: each rank checks its share of the files and
    the ranks pool what they found, so every rank takes the same checkpoint (or raises)."""
    from mmdit.parallel.state import all_gather_objects

    rank, world = _rank_and_world()
    names = all_gather_objects([p.name for p in checkpoints(run_dir)])[0]  # rank 0's listing, on every rank
    rejected = []
    for name in names:
        path = Path(run_dir) / CHECKPOINTS / name
        found = all_gather_objects(checkpoint_problems(path, rank, world))
        problems = list(dict.fromkeys(why for part in found for why in part))  # each once, in rank order
        if not problems:
            if rank == 0:
                for bad, reason in rejected:
                    log.warning("not resuming from %s: %s", bad, reason)
                if rejected:
                    log.warning("resuming from %s, the newest complete checkpoint", path)
            return path
        rejected.append((path, "; ".join(problems)))
    if rejected:
        raise CheckpointError("no checkpoint in " + str(Path(run_dir) / CHECKPOINTS) + " can be resumed from: "
                              + "; ".join(f"{p.name}: {why}" for p, why in rejected)
                              + " (move them away or set checkpoint.resume=false to start over)")
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, if complete (a quick look; resume uses `resume_checkpoint`)."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / TRAINER).is_file() else None


# ----------------------------------------------------------------------------- retention


def set_aside(path: Path) -> Path:
    """Move a checkpoint out of resume's and retention's sight, to checkpoints/rejected/, kept
    for a look (a second one of the same step gets a suffix)."""
    target = path.parent / REJECTED / path.name
    n = 1
    while target.exists():
        n += 1
        target = path.parent / REJECTED / f"{path.name}.{n}"
    target.parent.mkdir(exist_ok=True)
    path.rename(target)
    return target


READING = ".reading.lock"
"""A reader of a complete checkpoint (the evaluator, consumer/evaluator.py) holds a shared flock
on this file inside it while it reads; retention defers deleting a checkpoint so held."""
DELETING = ".deleting-"


@contextlib.contextmanager
def reading(path: Path) -> Iterator[bool]:
    """Hold the checkpoint at `path` for reading: yields True while retention cannot delete it,
    False when it is gone or being deleted (then read nothing)."""
    try:
        fd = os.open(Path(path) / READING, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # gone (renamed away by retention, or never there)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # retention holds it exclusively: being deleted
            yield False
            return
        try:  # still this checkpoint's lock file, not one retention has since moved away and deleted?
            held = os.stat(Path(path) / READING).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


def _delete_unless_read(path: Path) -> bool:
    """Delete a complete checkpoint unless a reader holds it (`reading`); True when deleted. The
    directory is renamed away under the exclusive lock first, so no reader can start on it."""
    try:
        fd = os.open(path / READING, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        doomed = path.with_name(f"{DELETING}{path.name}")
        path.rename(doomed)
    finally:
        os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def prune_checkpoints(run_dir: Path, keep: int, keep_every: int, resumed_from: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (0: keep all), except steps that are
    multiples of `keep_every`, and except one a reader holds (`reading`: deferred to the next
    prune); and what killed saves left (incomplete directories, temp files). With `resumed_from`,
    complete checkpoints newer than it (resume passed them over) are set aside first: kept, they
    would count among the newest and the good one would be deleted. Rank 0 only, while no save
    runs (an asynchronous save's directory is incomplete until it is published)."""
    from mmdit.utils.atomic import remove_stale_tmp

    root = Path(run_dir) / CHECKPOINTS
    remove_stale_tmp(root, "**/.tmp-*")
    for leftover in root.glob(f"{DELETING}*"):  # a prune killed mid-delete
        shutil.rmtree(leftover, ignore_errors=True)
    if resumed_from is not None:
        for p in checkpoints(run_dir):
            if step_of(p) > step_of(Path(resumed_from)) and (p / TRAINER).is_file():
                log.warning("set %s aside in %s: resume passed it over", p.name, set_aside(p).parent)
    complete = [p for p in checkpoints(run_dir) if (p / TRAINER).is_file()]
    doomed = []
    if keep > 0:
        for p in complete[keep:]:
            if keep_every and step_of(p) % keep_every == 0:
                continue
            if _delete_unless_read(p):
                doomed.append(p)
            else:
                log.info("%s is being read (the evaluator): deleting it at a later save", p.name)
    for p in checkpoints(run_dir):  # killed saves
        if not (p / TRAINER).is_file():
            shutil.rmtree(p, ignore_errors=True)
            doomed.append(p)
    return doomed


# ----------------------------------------------------------------------------- save and load


def _relative(recorded: dict[Path, tuple[int, str]], root: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(root).as_posix(): c for p, c in recorded.items() if p.is_relative_to(root)}


def _list_files(path: Path, recorded: dict[str, tuple[int, str]]) -> dict[str, dict]:
    """Size and checksum of every file in the checkpoint directory but trainer.json: as its
    writer recorded it, or read here (a file that was not written through utils/atomic)."""
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not is_tmp(p)):
        name = file.relative_to(path).as_posix()
        if name == TRAINER:
            continue
        if name in recorded:
            size, crc = recorded[name]
            if file.stat().st_size != size:
                raise CheckpointError(f"{name}: {file.stat().st_size} bytes on disk, {size} written")
        else:
            size, crc = file_checksum(file)
        files[name] = {"bytes": size, ALGORITHM: crc}
    return files


@dataclass
class StagedCheckpoint:
    """One rank's part of a checkpoint, taken at a step boundary: what `write_staged` writes.
    For an asynchronous save its tensors are host copies (parallel/staging.py), so training
    goes on while a background thread writes them; for a synchronous one, the live tensors."""

    path: Path
    step: int
    model_shard: dict[str, torch.Tensor] | None
    """This TP rank's slices (diffusers names), on DP rank 0 only: the other DP ranks hold copies."""
    shard_name: str
    optimizer: RankState | None
    """This rank's optimizer state; None for a backend that can only write in place (its
    `save_optimizer` runs at write time)."""
    backend: object
    dims: object
    data_state: dict
    trainer_state: dict
    ema: object | None = None
    """This rank's EMA weights (parallel/ema.py StagedEma), with train.ema_decay > 0."""
    objective: dict[str, torch.Tensor] | None = None
    """The objective's state on TP rank 0 (the TP ranks of a group hold the same); None: nothing."""


@dataclass
class WriteReport:
    """What `write_staged` did on this rank: the files it published with their checksums, or why not."""

    files: dict[str, tuple[int, str]]
    error: Exception | None = None


WRITE_DELAY_ENV = "MMDIT_CHECKPOINT_WRITE_DELAY_S"
"""Tests only: seconds the writer waits after the first file of a rank's part (a slow disk), so
a test can watch training go on, or kill a save mid-write."""


def stage_checkpoint(run_dir: Path, step: int, model, backend, dims, data_state: dict, trainer_state: dict,
                     staging: InPlace | None = None, ema=None, objective: dict | None = None) -> StagedCheckpoint:
    """Collective over all ranks (the finiteness check). Takes this rank's part of the checkpoint
    of `step` (and of the EMA weights, `ema`: parallel/ema.py) through `staging` (default: in
    place, for a write before training goes on).

    Refuses (CheckpointError, on every rank) to save non-finite weights."""
    from mmdit.parallel.state import all_ranks_true

    staging = staging or InPlace()
    bad = int(torch.stack([(~p.detach().isfinite()).sum() for p in model.parameters()]).sum())  # one host sync
    if not all_ranks_true(bad == 0):
        raise CheckpointError(f"step {step}: the model holds non-finite values ({bad} on rank {dist.get_rank()}); "
                              "not saving a checkpoint of it")
    shard = None
    if dims.dp_rank == 0:  # model/checkpoint.py write_model_shard's tensors (a LoRA run: adapters only), staged
        shard = {name: staging.copy(f"model/{name}", t) for name, t in checkpoint_tensors(model).items()}
    optimizer = backend.optimizer_state(dims, staging) if hasattr(backend, "optimizer_state") else None
    ema_state = ema.state(dims, staging) if ema is not None else None
    staging.synchronize()
    trainer_state = {**trainer_state, **({OBJECTIVE: True} if objective else {})}
    # the objective's tensors are on the CPU and replaced, never changed in place: no copy needed
    objective = objective if objective and dims.tp_rank == 0 else None
    return StagedCheckpoint(checkpoint_dir(run_dir, step), step, shard, shard_file(model.tp_rank, model.tp_size),
                            optimizer, backend, dims, json.loads(json.dumps(data_state)), trainer_state,
                            ema_state, objective)


def write_staged(staged: StagedCheckpoint) -> WriteReport:
    """Write this rank's files of a staged checkpoint, recording their checksums. No collective:
    the asynchronous writer runs it in its own thread. An OSError (a full disk) is reported, not
    raised: `publish_checkpoint` makes every rank agree on it."""
    path = staged.path
    with recording_checksums() as written:
        try:
            (path / OPTIMIZER).mkdir(parents=True, exist_ok=True)
            (path / MODEL).mkdir(exist_ok=True)
            if staged.model_shard is not None:
                atomic_save_safetensors(staged.model_shard, path / MODEL / staged.shard_name, {"format": MODEL_FORMAT})
            if delay := float(os.environ.get(WRITE_DELAY_ENV) or 0):
                time.sleep(delay)
            if staged.optimizer is not None:
                staged.optimizer.write(path / OPTIMIZER)
            else:
                staged.backend.save_optimizer(path / OPTIMIZER, staged.dims)
            if staged.ema is not None:
                staged.ema.write(path / EMA_DIR)
            if staged.objective is not None:
                (path / OBJECTIVE).mkdir(exist_ok=True)
                atomic_save_safetensors(staged.objective, objective_file(path / OBJECTIVE, staged.dims.dp_rank))
        except OSError as e:
            return WriteReport(_relative(written, path), e)
    return WriteReport(_relative(written, path))


def publish_checkpoint(staged: StagedCheckpoint, report: WriteReport, model) -> Path:
    """Collective over all ranks, once every rank wrote its part: rank 0 lists every file with its
    checksum in trainer.json, written last, then moves `latest`. Barriers are gloo
    (`parallel.state`): an NCCL barrier next to the data service's RPC threads can deadlock.

    A write that failed on any rank (a full disk: DiskFullError) fails on every rank, and the
    partial directory is removed, so `latest` and the previous checkpoint stay as they were."""
    from mmdit.parallel.state import all_gather_objects, all_ranks_true

    path, dims, error = staged.path, staged.dims, report.error
    # every rank's files are in place (this is also the barrier), their checksums on every rank
    reports = all_gather_objects({"error": error and f"{type(error).__name__}: {error}", "files": report.files})
    failed = [f"rank {r}: {report['error']}" for r, report in enumerate(reports) if report["error"]]
    if not failed and dist.get_rank() == 0:
        try:
            with recording_checksums() as written_here:
                write_model_index(model, path / MODEL)
                atomic_write_json(path / DATA, staged.data_state)
            recorded = {name: c for report in reports for name, c in report["files"].items()}
            files = _list_files(path, recorded | _relative(written_here, path))
            state = {**staged.trainer_state, "step": staged.step, "tp": dims.tp, "dp": dims.dp,
                     "backend": staged.backend.name, FILES: files}
            atomic_write_json(path / TRAINER, {**state, SEAL: _seal(state)})
            atomic_write_text(path.parent / LATEST, path.name)
        except (OSError, CheckpointError) as e:
            error = e
    if not all_ranks_true(error is None):
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(error, DiskFullError):
            raise error
        raise CheckpointError(f"checkpoint of step {staged.step} not written"
                              + (f": {error}" if error else f" ({'; '.join(failed)})" if failed
                                 else " (another rank failed to write its part)"))
    return path


def save_checkpoint(run_dir: Path, step: int, model, backend, dims, data_state: dict, trainer_state: dict,
                    ema=None, objective: dict | None = None) -> Path:
    """Stage, write and publish in one go (collective over all ranks); consumer/async_save.py
    runs the same three steps with the write in the background."""
    staged = stage_checkpoint(run_dir, step, model, backend, dims, data_state, trainer_state, ema=ema,
                              objective=objective)
    return publish_checkpoint(staged, write_staged(staged), model)


def load_checkpoint(path: Path, model, backend, dims, ema=None) -> tuple[dict, dict]:
    """Load model and optimizer state (and into `ema` the EMA weights: parallel/ema.py), saved at
    any TP x DP layout; return (trainer state, data state)."""
    state = json.loads((path / TRAINER).read_text())
    load_model(model, path / MODEL)
    if state["backend"] != backend.name:
        raise ValueError(f"{path} holds {state['backend']} optimizer state; this run uses {backend.name}")
    backend.load_optimizer(StateReader(path / OPTIMIZER, state["tp"], state["dp"], param_layouts(model)), dims)
    if ema is not None:
        ema.load(path / EMA_DIR, dims)
    data = json.loads((path / DATA).read_text()) if (path / DATA).is_file() else {}
    return state, data


def load_objective_state(path: Path, state: dict, dims) -> dict[str, torch.Tensor] | None:
    """This DP rank's objective state in checkpoint `path` (trainer state `state`); None when it
    holds none, or when it was saved at another DP size (each DP rank's state is its own)."""
    if not state.get(OBJECTIVE):
        return None
    if state["dp"] != dims.dp:
        log.warning("%s holds the objective's state of %d DP ranks, this run has %d: starting it afresh",
                    path, state["dp"], dims.dp)
        return None
    from safetensors.torch import load_file

    return load_file(str(objective_file(path / OBJECTIVE, dims.dp_rank)))


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
