"""`mmdit submit` on a real one-node SLURM cluster (Debian's slurm-wlm + munge, tests/slurm_cluster.py).

A one-node cluster cannot start a heterogeneous job (SLURM gives each component nodes of its
own), so the producer-node layout is checked as a rendered script (`bash -n`, its structure),
and the layout with the data service on the first trainer node runs for real: a job to the end,
and a job told to stop (USR1, SLURM's warning before the time limit) that checkpoints, requeues
itself, resumes, and trains the same per-step losses as an uninterrupted run.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmdit.cache.store import LatentCache
from mmdit.utils.jsonl import read_jsonl
from mmdit.utils.processes import ServeProcess, free_port


def submit(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "submit", *args], capture_output=True, text=True,
                          timeout=120, env=env)


# ----------------------------------------------------------------------------- rendering


def test_a_64_node_layout_renders_a_valid_heterogeneous_script(tmp_path):
    done = submit("--dry-run", f"run.dir={tmp_path}", "model=qwen_image_20b", "parallel.tp=8",
                  "launch.trainer_nodes=56", "launch.gpus_per_node=8", "launch.producer_nodes=8",
                  "launch.producers_per_node=4", "launch.slurm.partition=gpu", "launch.slurm.account=proj",
                  "launch.slurm.time=48:00:00", "launch.slurm.container_image=nvcr.io/x/mmdit:1",
                  "launch.slurm.extra=['--exclusive','--constraint=h100']")
    assert done.returncode == 0, done.stderr
    script = done.stdout
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    trainers, producers = head[:head.index("#SBATCH hetjob")], head[head.index("#SBATCH hetjob") + 1:]
    assert "#SBATCH --nodes=56" in trainers and "#SBATCH --gpus-per-node=8" in trainers
    assert "#SBATCH --nodes=8" in producers and not any("gpus" in x for x in producers)
    for line in ("#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --account=proj",
                 "#SBATCH --time=48:00:00", "#SBATCH --exclusive", "#SBATCH --constraint=h100"):
        assert line in head, line
    assert "-m mmdit.launch.agent --nnodes=56 --nproc-per-node=8 --rdzv-backend=mmdit" in script
    assert "--het-group=1 --ntasks-per-node=4" in script and "service.dp_size=56" in script
    assert "--container-image=nvcr.io/x/mmdit:1" in script and "scontrol requeue" in script
    assert script.count("--het-group=1") == 2 and script.count("--het-group=0") == 1


@pytest.mark.parametrize("args,words", [
    (["parallel.tp=3", "launch.gpus_per_node=8"], "must divide model.num_attention_heads"),
    (["model=qwen_image_20b", "parallel.tp=3", "launch.gpus_per_node=8"], "must divide launch.gpus_per_node=8"),
    (["parallel.tp=4", "launch.gpus_per_node=2"], "must divide launch.gpus_per_node=2"),
    (["launch.trainer_nodes=0"], "launch.trainer_nodes (0)"),
    (["launch.producer_nodes=-1"], "launch.producer_nodes must be >= 0"),
])
def test_bad_layouts_are_rejected_with_the_reason(tmp_path, args, words):
    done = submit("--dry-run", f"run.dir={tmp_path}", *args)
    assert done.returncode == 2 and words in done.stderr, done.stderr


# ----------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import SlurmCluster

    if not SlurmCluster.available():
        pytest.fail("slurm-wlm and munge are not installed: `make test` installs them (Debian packages)")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def cache(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    LatentCache(path).write([
        {"key": f"k{i:03d}", "fingerprint": "fp_slurm", "bucket": (128, 128), "task": "t2i", "caption": "c",
         "source": "s", "latents": torch.randn(16, 16, 16, generator=g), "prompt_embeds": torch.randn(6, 64, generator=g)}
        for i in range(48)])
    return path


def job_args(run: Path, cache_dir: Path, steps: int) -> list[str]:
    return [f"run.dir={run}", f"cache.dir={cache_dir}", "launch.trainer_nodes=1", "launch.gpus_per_node=2",
            "launch.producers_per_node=2", "launch.slurm.gpus=false", "launch.slurm.time=00:30:00",
            "launch.slurm.signal_s=60", f"service.port={free_port()}", f"train.steps={steps}", "checkpoint.every=10",
            "train.micro_batch_size=1", "train.tensorboard=false"]


def metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")  # the job may be writing the last line


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_submitted_job_trains_to_the_end(cluster, tmp_path):
    run = tmp_path / "run"
    done = submit(*job_args(run, cache(tmp_path / "cache"), 12), env=cluster.env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    state = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600)
    log = (run / "logs" / f"slurm-{job}.out").read_text() if (run / "logs" / f"slurm-{job}.out").exists() else ""
    assert state == "COMPLETED", log + "".join(p.read_text()[-2000:] for p in (run / "logs").glob("trainer-*"))
    assert "ExitCode=0:0" in cluster.run("scontrol", "show", "job", job).stdout
    assert [r["step"] for r in metrics(run)] == list(range(1, 13))
    assert (run / "checkpoints" / "latest").read_text() == "step_00000012"
    assert (run / "submit" / "job.sbatch").exists() and (run / "submit" / "config.yaml").exists()
    assert list((run / "logs").glob("coordinator-*.log")) and list((run / "logs").glob("trainer-*.log"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_time_limit_warning_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path):
    cache_dir = cache(tmp_path / "cache")
    steps = 80  # USR1 comes after step 20: the rest leaves the signal ample time on any machine
    run = tmp_path / "run"
    done = submit(*job_args(run, cache_dir, steps), env=cluster.env)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip()
    deadline = time.monotonic() + 600
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 20:
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    # the uninterrupted reference (the same data service and trainer, started by hand) trains
    # meanwhile: the requeued job spends most of its time held by SLURM and starting up
    ref = tmp_path / "reference"
    port = free_port()
    serve = ServeProcess([f"cache.dir={cache_dir}", f"run.dir={ref / 'service'}", f"service.port={port}",
                          "service.producers=2", "service.dp_size=2", "train.micro_batch_size=1"])
    with open(tmp_path / "reference.log", "w") as log:
        reference = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={ref}",
                                      f"cache.dir={cache_dir}", f"service.port={port}", "service.dp_size=2",
                                      "train.data_source=service", "launch.nproc=2", f"train.steps={steps}",
                                      "train.micro_batch_size=1", "train.tensorboard=false"],
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 900
        while "Restarts=1" not in cluster.run("scontrol", "show", "job", job).stdout:
            assert time.monotonic() < deadline, "the job did not requeue\n" + cluster.report(job, run)
            time.sleep(1)
        # SLURM holds the requeued job for SlurmCluster.CRED_EXPIRE_S; the first incarnation's end
        # (CANCELLED due to the requeue) can show meanwhile: wait for the requeued job's trainers to
        # resume before waiting for the job to end
        trainer_logs = lambda: "".join(p.read_text(errors="replace") for p in (run / "logs").glob("trainer-*.log"))  # noqa: E731
        deadline = time.monotonic() + 900
        while "resumed from" not in trainer_logs():
            assert time.monotonic() < deadline, "the requeued job never resumed\n" + cluster.report(job, run)
            time.sleep(1)
        state = cluster.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 900)
        assert state == "COMPLETED", cluster.report(job, run)
        assert reference.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:  # a failed check: the launcher stops its ranks
            reference.terminate()
            try:
                reference.wait(timeout=120)
            except subprocess.TimeoutExpired:
                reference.kill()
                reference.wait()
        serve.stop()
        serve.kill()
    interrupted = metrics(run)
    assert [r["step"] for r in interrupted] == list(range(1, steps + 1))  # each step once, none lost
    log = (run / "logs" / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log
    # USR1 made the ranks checkpoint where they were: the requeued job loses no step
    trainer_log = trainer_logs()
    resumed_at = [int(n) for n in re.findall(r"resumed from \S+ at step (\d+)", trainer_log)]
    assert resumed_at and min(resumed_at) >= 20 and "not resuming from" not in trainer_log, trainer_log[-3000:]
    assert [r["loss"] for r in interrupted] == pytest.approx([r["loss"] for r in metrics(ref)], abs=1e-6)
