"""Asynchronous checkpoints (consumer/async_save.py) and retention beside a reader: training goes
on while a slowed writer writes, a save killed mid-write costs only itself, a stop waits for the
write, and resuming from asynchronous saves reproduces the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mmdit.consumer.checkpoint import WRITE_DELAY_ENV, checkpoints, prune_checkpoints, reading, verify_checkpoint

# ----------------------------------------------------------------------------- in process


def _fake_checkpoints(run: Path, steps) -> None:
    for step in steps:  # retention only looks at trainer.json to tell complete from killed saves
        path = run / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "trainer.json").write_text("{}")


def test_retention_defers_a_checkpoint_being_read(tmp_path):
    _fake_checkpoints(tmp_path, (1, 2, 3))
    oldest, middle = (tmp_path / "checkpoints" / f"step_{s:08d}" for s in (1, 2))
    with reading(oldest) as held:
        assert held
        deleted = prune_checkpoints(tmp_path, keep=1, keep_every=0)
        assert deleted == [middle] and oldest.is_dir()  # held: deferred, the other one goes
        assert (oldest / "trainer.json").is_file()
    assert prune_checkpoints(tmp_path, keep=1, keep_every=0) == [oldest]  # released: the next prune takes it
    assert [p.name for p in checkpoints(tmp_path)] == ["step_00000003"]
    with reading(oldest) as held:  # gone: nothing to read
        assert not held
    assert not list((tmp_path / "checkpoints").glob(".deleting-*"))


def test_an_asynchronous_save_writes_the_state_of_its_step_while_training_changes_it(tmp_path, monkeypatch):
    """The files of an asynchronous save are those of a synchronous save of the same state, even
    when the model and the optimizer state change while the (slowed) writer writes."""
    from mmdit.config.loader import load_config
    from mmdit.consumer.async_save import Checkpointer
    from mmdit.consumer.checkpoint import save_checkpoint
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    cfg = load_config(["parallel.backend=torch"])
    try:
        built = parallelize(cfg.model, cfg.parallel, optimizer=cfg.optimizer, seed=0)
        model, backend = built.model, built.backend
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        assert backend.step()[1]
        save_checkpoint(tmp_path / "sync", 1, model, backend, built.dims, {"cursor": 1}, {"seed": 0})
        monkeypatch.setenv(WRITE_DELAY_ENV, "1")  # the writer waits after the model, before the optimizer
        saver = Checkpointer(tmp_path / "async", keep=0, keep_every=0, asynchronous=True, rank0=True)
        stall = saver.save(1, model, backend, built.dims, {"cursor": 1}, {"seed": 0})
        assert saver.pending is not None and not saver.pending.done()  # returned while the writer writes
        assert stall < 1
        with torch.no_grad():  # the next steps change every tensor in place
            for p in model.parameters():
                p.add_(1.0)
            for state in backend.optimizer.optim.state.values():
                state["exp_avg"].add_(1.0)
                state["step"].add_(1)
        assert not (tmp_path / "async" / "checkpoints" / "latest").exists()  # not published yet
        saver.finish(model)
    finally:
        destroy_parallel()
    sync, asynchronous = (tmp_path / name / "checkpoints" / "step_00000001" for name in ("sync", "async"))
    assert verify_checkpoint(asynchronous) is None
    names = sorted(str(p.relative_to(sync)) for p in sync.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(asynchronous)) for p in asynchronous.rglob("*") if p.is_file())
    from safetensors import safe_open

    for name in names:
        if name.endswith(".safetensors"):  # the header's metadata order is safetensors' own, per write
            with safe_open(sync / name, "pt") as a, safe_open(asynchronous / name, "pt") as b:
                assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
                for key in a.keys():
                    assert torch.equal(a.get_tensor(key), b.get_tensor(key)), f"{name}: {key}"
        elif name != "trainer.json":
            assert (sync / name).read_bytes() == (asynchronous / name).read_bytes(), name


# ----------------------------------------------------------------------------- real processes

BASE = ["train.random_height=64", "train.random_width=64", "optimizer.lr=1e-3", "optimizer.warmup_steps=1",
        "optimizer.lr_schedule=constant", "train.micro_batch_size=1", "checkpoint.keep=0"]


def train_cmd(run: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run}", *BASE, *overrides]


def train(run: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(train_cmd(run, *overrides), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if not r.get("eval")]


def wait_until(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_goes_on_while_a_save_is_written_and_a_kill_mid_write_resumes_from_the_previous(tmp_path):
    """Step 2 is saved (asynchronously) and published. The save of step 4 is slowed: the trainer
    runs steps 5 and 6 while its files are written, and is SIGKILLed mid-write. The rerun resumes
    from step 2, removes the half-written step 4, and its losses equal an uninterrupted run's."""
    run = tmp_path / "run"
    train(run, "train.steps=2", "checkpoint.every=2")
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    step4 = run / "checkpoints" / "step_00000004"
    proc = subprocess.Popen(train_cmd(run, "train.steps=100", "checkpoint.every=2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", WRITE_DELAY_ENV: "600"})
    try:
        wait_until(lambda: any(r["step"] >= 6 for r in steps(run)), proc, 300, "step 6")
        assert list((step4 / "model").glob("*.safetensors")), "the writer of step 4 has not started"
        assert not (step4 / "trainer.json").exists()  # still writing: steps 5 and 6 ran meanwhile
        assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reference = tmp_path / "reference"
    with ThreadPoolExecutor(2) as pool:  # the rerun and an uninterrupted run, at once (mostly start-up)
        rerun = pool.submit(train, run, "train.steps=6", "checkpoint.every=2")
        pool.submit(train, reference, "train.steps=6", "checkpoint.every=0").result()
        resumed = rerun.result()
    assert "resumed from" in resumed.stdout + resumed.stderr and "at step 2" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in steps(run)] == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in checkpoints(run)] == ["step_00000006", "step_00000004", "step_00000002"]
    assert all(verify_checkpoint(p) is None for p in checkpoints(run))
    assert [r["loss"] for r in steps(run)] == pytest.approx([r["loss"] for r in steps(reference)], abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stop_waits_for_the_checkpoint_write(tmp_path):
    """SIGTERM: the trainer saves at the end of its step and exits only once the (slowed) write is
    published: the checkpoint it names is complete."""
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, "train.steps=100000", "checkpoint.every=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", WRITE_DELAY_ENV: "3"})
    wait_until(lambda: len(steps(run)) >= 2, proc, 300, "two steps")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    last = steps(run)[-1]["step"]
    assert f"stopped at step {last}" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert verify_checkpoint(run / "checkpoints" / f"step_{last:08d}") is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] and summary["checkpoint_stall_s"] >= 3  # it waited for the slowed write
