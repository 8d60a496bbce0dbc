"""`mmdit demo`: the whole local pipeline, as the README's first command runs it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # real processes


@pytest.mark.timeout(1800)  # two demo runs; under load one took 270 s
def test_demo_trains_from_synthetic_shards_through_the_data_service(tiny_encoders_dir, tmp_path):
    """The README's first command, shortened: TP=2 ranks over the data service, held-out
    evaluation, final samples, a summary; a rerun reuses the cache and resumes. The session's
    tiny encoders (the demo's own first stage, `mmdit make-tiny-encoders`) are reused."""
    run = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "demo", f"run.dir={run}", f"encoders.dir={tiny_encoders_dir}",
           "train.steps=6", "eval.every=3", "synth.num_samples=24"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "== done" in out and "steps on TP=2 x DP=1" in out and "held-out loss" in out and "dashboard http" in out
    assert "Warning" not in out + result.stderr and "warn(" not in out + result.stderr  # a quiet console

    report = json.loads((run / "cache" / "report.json").read_text())
    assert report["seen"] == 24 and report["encoded"] == report["accepted"] > 0
    assert report["categories"] == {"synthetic": report["accepted"]}  # synth's metadata names it
    from mmdit.cache.manifest import read_manifest

    rows = read_manifest(run / "cache" / "manifest").to_pylist()  # annotate filled the manifest
    assert len(rows) == 24 and all(r["annotation_status"] == "unparseable" and r["alignment"] is not None
                                   for r in rows)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("eval")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r.get("eval") is True] == [3, 6]  # held-out loss
    (text,) = [r for r in records if r.get("eval") == "text_rendering"]  # mmdit eval of the last checkpoint
    assert text["step"] == 6 and text["prompts"] == 6 and set(text["by_language"]) == {"en", "zh"}
    assert text["word_accuracy"] <= 0.2 and "text rendering (OCR, 6 prompts): word accuracy" in out  # noise, rightly
    assert (run / "eval" / "step_00000006" / "index.html").is_file()
    steps = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    keys = [k for s in steps for k in s["keys"]]
    assert len(keys) == len(set(keys)), "a sample was served twice within the first epoch"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    services = json.loads((run / "service" / "processes.json").read_text())
    assert sorted(p["role"] for p in services) == ["coordinator", "producer", "producer"]
    ranks = [p for p in json.loads((run / "processes.json").read_text()) if p["role"] == "trainer"]
    assert len(ranks) == 2 and all(p["returncode"] == 0 for p in ranks)
    grid = Image.open(run / "samples" / "final" / "grid.png")
    assert grid.size == (2 * 128, 2 * 128)

    # A second run reuses everything: nothing is encoded again, training resumes at step 6 (the
    # evaluator, checked above, stays off).
    again = subprocess.run(cmd[:-3] + ["train.steps=8", "eval.every=0", "synth.num_samples=24", "eval.evaluator=false"],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((run / "cache" / "report.json").read_text())["encoded"] == 0
    assert json.loads((run / "cache" / "annotate_report.json").read_text())["done"] == 0  # nor annotated
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if not r.get("eval")][-3:] == [6, 7, 8]


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie has finished: its parent just has not reaped it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(600)
def test_demo_grpo_stage_scores_on_one_reward_worker_and_stops_it(tiny_encoders_dir, tmp_path):
    """`mmdit demo --stage grpo` from a pretrain checkpoint: a data service, one `mmdit reward-worker`
    (OCR with the tiny encoders), two GRPO steps; every image scored by the worker, and the worker
    and the service gone at the end. The pretrain demo's outputs are made the cheap way: a 1-step
    `mmdit train` on random data (the checkpoint) beside `mmdit synth` + `mmdit produce` of 4 samples (the cache
    the service plans from)."""
    run = tmp_path / "demo"
    cli = [sys.executable, "-m", "mmdit.launch.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared CPU machine
    pretrain = subprocess.Popen(
        [*cli, "train", f"run.dir={run}", f"encoders.dir={tiny_encoders_dir}", "train.data_source=random",
         "train.steps=1", "checkpoint.every=1", "checkpoint.async_save=false", "train.tensorboard=false",
         "train.random_height=32", "train.random_width=32", "train.micro_batch_size=1", "eval.every=0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for cmd in ([*cli, "synth", str(run / "shards"), "num_samples=4"],
                [*cli, "produce", f"data.shards={run / 'shards'}/*.tar", f"run.dir={run}",
                 f"encoders.dir={tiny_encoders_dir}"]):
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    assert pretrain.wait(timeout=300) == 0, pretrain.stderr.read()[-3000:]

    result = subprocess.run([*cli, "demo", "--stage", "grpo", f"run.dir={run}", f"encoders.dir={tiny_encoders_dir}",
                             "launch.nproc=1", "parallel.tp=1", "train.steps=2"],
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if not r.get("eval")]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["objective"]["reward_mean"]) and r["objective"]["images"] == 8 for r in steps)
    assert all(r["objective"]["dropped_samples"] == 0 for r in steps)  # the worker answered every chunk
    assert result.stdout.count("reward mean") == 2 and f"run {run / 'grpo'}" in result.stdout
    worker_log = (run / "logs" / "reward-worker.log").read_text()
    assert "'images': 16" in worker_log, worker_log[-2000:]  # scored there, not in the trainer

    demo = {p["role"]: p for p in json.loads((run / "processes.json").read_text())}
    assert demo["reward-worker"]["returncode"] == 0 and demo["serve-grpo"]["returncode"] == 0
    service = json.loads((run / "grpo" / "service" / "processes.json").read_text())
    pids = [demo["reward-worker"]["pid"], demo["serve-grpo"]["pid"], *(p["pid"] for p in service)]
    assert not [pid for pid in pids if _alive(pid)]
    assert not (run / "grpo" / "service" / "address.json").exists()  # the service left
