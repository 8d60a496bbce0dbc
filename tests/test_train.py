"""`mmdit train` end to end, as real processes: metrics, resume, and TP/DP invariance."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BASE = ["train.micro_batch_size=2", "train.random_height=128", "train.random_width=128", "optimizer.lr=1e-3",
        "optimizer.warmup_steps=2"]
FIELDS = {"step", "loss", "lr", "grad_norm", "samples_per_second", "tflops_per_gpu", "mfu",
          "data_wait_fraction", "config_version"}


def train(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run_dir}", *BASE, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_metrics_summary_and_learning(tmp_path):
    train(tmp_path, "train.steps=12", "train.random_pool_size=2")
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(FIELDS <= r.keys() for r in records)
    assert all(0 <= r["data_wait_fraction"] < 1 and r["samples_per_second"] > 0 for r in records)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == "torch-ddp+zero1" and summary["steps_run"] == 12
    first, last = sum(r["loss"] for r in records[:3]), sum(r["loss"] for r in records[-3:])
    assert last < first, "fitting two samples must lower the loss"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Six uninterrupted single-process steps: the curve the resumed and the TP/DP runs follow
    (read only)."""
    run = tmp_path_factory.mktemp("straight")
    train(run, "train.steps=6")
    return run


@pytest.mark.slow
def test_resume_continues_exactly(straight, tmp_path):
    resumed = tmp_path / "resumed"
    train(resumed, "train.steps=3")
    assert (resumed / "checkpoints" / "latest").read_text() == "step_00000003"
    train(resumed, "train.steps=6")
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(straight)]


@pytest.mark.slow
def test_resume_at_other_tp_and_dp_sizes_follows_the_same_curve(straight, tmp_path):
    """Optimizer state written by two TP ranks, resumed by two DP ranks, then by one process (each
    rank reads only its part): the loss curve of the uninterrupted run."""
    run = tmp_path / "resharded"
    same_schedule = "optimizer.decay_steps=6"  # the decay would follow each leg's train.steps
    train(run, "train.steps=2", "launch.nproc=2", "parallel.tp=2", same_schedule)
    train(run, "train.steps=4", "launch.nproc=2", "train.micro_batch_size=1", same_schedule)
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000004" / "optimizer").iterdir()) == [
        "tp00-dp00.safetensors", "tp00-dp01.safetensors"]
    train(run, "train.steps=6", same_schedule)
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(straight)], abs=1e-5)


@pytest.mark.slow
def test_tensor_and_data_parallel_match_single_process(straight, tmp_path):
    """TP=2 with sequence parallelism and DP=2 (one sample per rank) follow the single-process
    loss curve (TP=2 without it: the TP=2 leg of the resharding test above): three steps on the
    learning-rate schedule of the six-step single-process run."""
    same_schedule = "optimizer.decay_steps=6"
    with ThreadPoolExecutor(2) as pool:  # independent runs, mostly starting up: two cores overlap them
        sp = pool.submit(train, tmp_path / "tp2_sp", "train.steps=3", same_schedule, "launch.nproc=2",
                         "parallel.tp=2", "parallel.sequence_parallel=true")
        dp = pool.submit(train, tmp_path / "dp2", "train.steps=3", same_schedule, "launch.nproc=2",
                         "train.micro_batch_size=1")
        assert "tp 2 (sequence parallel) x dp 1" in sp.result().stdout
        dp.result()
    expected = metrics(straight)[:3]
    for name in ("tp2_sp", "dp2"):
        got = metrics(tmp_path / name)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-5), name
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4), name


@pytest.mark.slow
def test_bad_config_is_rejected_with_reason(tmp_path):
    result = train(tmp_path, "parallel.recompute=sometimes", check=False)
    assert result.returncode == 2
    assert "parallel.recompute must be one of" in result.stderr
    result = train(tmp_path, "parallel.backend=megatron", check=False)
    assert result.returncode != 0 and "needs a GPU" in result.stderr
