"""Checkpoint contents are verified: a file whose bytes changed after the save (NaNs over the
weights, one changed value, a flipped byte in an optimizer shard), same size and structure intact,
is named by `mmdit checkpoint verify` and passed over by resume, which falls back to the older
good checkpoint and trains on from it.

The quick tests save real checkpoints of a tiny model in this process (consumer/checkpoint.py's
save path, one rank); the slow one trains with two real ranks, damages, and resumes.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from mmdit.utils.safetensors_header import read_header

MODEL_FILE = "model/model-tp00-of-01.safetensors"
OPTIMIZER_FILE = "optimizer/tp00-dp00.safetensors"
EMA_FILE = "ema/weights.safetensors"


# ----------------------------------------------------------------------------- damage, in place


def overwrite_with_nans(path: Path) -> None:
    """Every tensor byte becomes float32 NaN; the header and the size stay (a bad disk, a bad copy)."""
    _, start, size = read_header(path)
    nan = torch.tensor(float("nan"), dtype=torch.float32).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(start)
        f.write((nan * ((size - start) // 4 + 1))[:size - start])


def change_one_value(path: Path) -> None:
    """One float32 of the first tensor changes by one ulp: plausible, finite, silently wrong."""
    header, start, _ = read_header(path)
    name = sorted(k for k, t in header.items() if k != "__metadata__" and t["dtype"] == "F32")[0]
    offset = start + header[name]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(offset)
        value = torch.frombuffer(bytearray(f.read(4)), dtype=torch.int32)
        f.seek(offset)
        f.write((value ^ 1).numpy().tobytes())


def flip_a_byte(path: Path) -> None:
    """One byte in the middle of the tensor data, inverted."""
    _, start, size = read_header(path)
    middle = (start + size) // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([byte ^ 0xFF]))


DAMAGE = {"nans": (MODEL_FILE, overwrite_with_nans), "one_value": (MODEL_FILE, change_one_value),
          "flipped_optimizer_byte": (OPTIMIZER_FILE, flip_a_byte), "flipped_ema_byte": (EMA_FILE, flip_a_byte)}


# ----------------------------------------------------------------------------- checkpoints saved in-process


class WithEMA:
    """The backend plus a part the checkpoint code knows nothing about (an EMA, say), which writes
    its own file with a plain, non-atomic write: the checksum list must cover it too."""

    def __init__(self, backend):
        self.backend, self.name = backend, backend.name

    def save_optimizer(self, directory: Path, dims) -> None:
        from safetensors.torch import save_file

        self.backend.save_optimizer(directory, dims)
        (directory.parent / "ema").mkdir(exist_ok=True)
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(directory.parent / EMA_FILE))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A run directory with the checkpoints of steps 1 and 2 of a tiny model, written by
    `save_checkpoint` in one process."""
    from mmdit.config.loader import load_config
    from mmdit.consumer.checkpoint import save_checkpoint
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    run = tmp_path_factory.mktemp("saved_run")
    cfg = load_config(["parallel.backend=torch"])
    try:
        built = parallelize(cfg.model, cfg.parallel, optimizer=cfg.optimizer, seed=0)
        model, backend = built.model, built.backend
        for step in (1, 2):
            for p in model.parameters():
                p.grad = torch.full_like(p, 1e-3)
            assert backend.step()[1]
            save_checkpoint(run, step, model, WithEMA(backend), built.dims, {"cursor": step}, {"seed": 0})
    finally:
        destroy_parallel()
    return run


@pytest.fixture
def run(saved_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    return copy


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def verify_cli(path: Path, capsys) -> tuple[int, dict]:
    from mmdit.launch.cli import main

    code = main(["checkpoint", "verify", str(path)])
    return code, json.loads(capsys.readouterr().out)


def test_every_file_is_listed_with_its_size_and_checksum(run):
    from mmdit.consumer.checkpoint import verify_checkpoint

    ckpt = step_dir(run, 2)
    files = json.loads((ckpt / "trainer.json").read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert sorted(files) == [n for n in on_disk if n != "trainer.json"]  # EMA_FILE too
    for name, entry in files.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    assert verify_checkpoint(ckpt) is None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_changed_contents_are_named_by_verify_and_resume_falls_back(run, damage, capsys, caplog):
    from mmdit.consumer.checkpoint import resume_checkpoint, verify_checkpoint

    name, damage_file = DAMAGE[damage]
    size = (step_dir(run, 2) / name).stat().st_size
    damage_file(step_dir(run, 2) / name)
    assert (step_dir(run, 2) / name).stat().st_size == size  # the structure checks alone pass it

    why = verify_checkpoint(step_dir(run, 2))
    assert why is not None and name in why and "checksum" in why
    assert verify_checkpoint(step_dir(run, 1)) is None

    code, report = verify_cli(run, capsys)
    assert code == 1
    assert report["checkpoints"]["step_00000002"]["damaged"] == [name]
    assert report["checkpoints"]["step_00000001"]["damaged"] == []
    assert report["resume_from"] == "step_00000001"
    assert verify_cli(step_dir(run, 2), capsys)[0] == 1
    assert verify_cli(step_dir(run, 1), capsys)[0] == 0

    with caplog.at_level(logging.WARNING, logger="mmdit.checkpoint"):
        assert resume_checkpoint(run) == step_dir(run, 1)
    assert any("not resuming from" in r.message and "step_00000002" in r.message and name in r.message
               for r in caplog.records), caplog.text


def test_trainer_json_itself_is_covered(run):
    from mmdit.consumer.checkpoint import resume_checkpoint, verify_checkpoint

    path = step_dir(run, 2) / "trainer.json"
    path.write_text(path.read_text().replace('"seed": 0', '"seed": 7'))  # still valid JSON
    assert "trainer.json" in (verify_checkpoint(path.parent) or "")
    assert resume_checkpoint(run) == step_dir(run, 1)


def test_old_checkpoints_without_checksums_still_load_with_one_warning(run, caplog):
    from mmdit.consumer.checkpoint import resume_checkpoint, verify_checkpoint

    for step in (1, 2):
        path = step_dir(run, step) / "trainer.json"
        state = json.loads(path.read_text())
        path.write_text(json.dumps({k: state[k] for k in ("seed", "step", "tp", "dp", "backend")}))
    with caplog.at_level(logging.WARNING, logger="mmdit.checkpoint"):
        assert resume_checkpoint(run) == step_dir(run, 2)
        assert verify_checkpoint(step_dir(run, 1)) is None
        assert verify_checkpoint(step_dir(run, 2)) is None
    warnings = [r for r in caplog.records if "no checksums" in r.message]
    assert len(warnings) == 1, caplog.text
    shard = step_dir(run, 2) / MODEL_FILE  # structure is still checked
    shard.write_bytes(shard.read_bytes()[:1000])
    assert MODEL_FILE in (verify_checkpoint(step_dir(run, 2)) or "")


def test_retention_after_a_fallback_keeps_the_good_checkpoint_and_sets_the_damaged_aside(run):
    """keep_checkpoints=1 right after resuming from step 1 past a damaged step 2: counting step 2
    among the newest would delete step 1, the only good one."""
    from mmdit.consumer.checkpoint import checkpoints, prune_checkpoints

    overwrite_with_nans(step_dir(run, 2) / MODEL_FILE)
    prune_checkpoints(run, keep=1, keep_every=0, resumed_from=step_dir(run, 1))
    assert checkpoints(run) == [step_dir(run, 1)]
    assert (run / "checkpoints" / "rejected" / "step_00000002" / MODEL_FILE).is_file()  # kept for a look


@pytest.mark.timeout(60)  # reading the pipe would block forever
def test_a_pipe_in_place_of_a_file_is_named_not_read(run):
    from mmdit.consumer.checkpoint import verify_checkpoint

    (step_dir(run, 2) / "data.json").unlink()
    os.mkfifo(step_dir(run, 2) / "data.json")  # opening it to read would block forever
    assert "data.json: not a regular file" in (verify_checkpoint(step_dir(run, 2)) or "")


def test_verify_rejects_a_path_that_is_no_run_or_checkpoint(tmp_path, capsys):
    from mmdit.launch.cli import main

    assert main(["checkpoint", "verify", str(tmp_path)]) == 2
    assert "neither a run directory nor a checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real trainer, two ranks


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run_dir}", "launch.nproc=2",
           "train.micro_batch_size=1", "train.random_height=64", "train.random_width=64", "optimizer.warmup_steps=1",
           "checkpoint.every=1", "checkpoint.keep=4", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_resumes_from_the_older_good_checkpoint_when_newer_ones_changed(tmp_path, capsys):
    """Two DP ranks (each verifies part of the files; they agree on one checkpoint)."""
    first = train(tmp_path, "train.steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = {4: (MODEL_FILE, overwrite_with_nans), 3: (MODEL_FILE, change_one_value),
               2: ("optimizer/tp00-dp01.safetensors", flip_a_byte)}
    for step, (name, damage_file) in damaged.items():
        damage_file(step_dir(tmp_path, step) / name)

    code, report = verify_cli(tmp_path, capsys)
    assert code == 1
    assert {n: c["damaged"] for n, c in report["checkpoints"].items()} == {
        "step_00000004": [MODEL_FILE], "step_00000003": [MODEL_FILE],
        "step_00000002": ["optimizer/tp00-dp01.safetensors"], "step_00000001": []}

    resumed = train(tmp_path, "train.steps=6")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    for step, (name, _) in damaged.items():
        assert any("not resuming from" in line and f"step_{step:08d}" in line and name in line
                   for line in log.splitlines()), log[-3000:]
    assert "resumed from" in log and "at step 1" in log
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once, 2..4 trained again
    assert all(r["loss"] == r["loss"] and not r.get("skipped") for r in rows)  # finite: not the NaN weights
    # the damaged ones were set aside, not pruned in place of the good one, and not mixed into the new saves
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "rejected").iterdir()) == [
        "step_00000002", "step_00000003", "step_00000004"]
    code, report = verify_cli(tmp_path, capsys)
    assert code == 0 and sorted(report["checkpoints"]) == ["step_00000003", "step_00000004", "step_00000005",
                                                            "step_00000006"]
