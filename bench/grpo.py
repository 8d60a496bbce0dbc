"""GRPO on the reward service: how long the trainer waits for rewards, with 1 vs 2 reward workers.

Real processes on loopback: `mmdit serve` (on a two-sample latent cache written here, no
producers: GRPO trains on its own rollouts), `--workers` counts of `mmdit reward-worker`, and for
each count one `mmdit train` of a tiny GRPO run (train.grpo.reward_service=true, 4 prompts x
G=4 images a step, rolled out one prompt's group at a time so each chunk is scored while the next
samples and the first ones train). The reward is `slow_latent_target` below: the latent_target
score after sleeping `--sleep-ms` per image, a stand-in for an OCR or VLM reward that costs
enough to matter next to a tiny model on a CPU. The worker counts run one after another on the
same service (workers are added or stopped in between).

Per step, from the run's metrics.jsonl: rollout_s, reward_wait_s (the update blocked on a chunk's
rewards), update_s, reward_s (first submit to last reward back), images, and the trainer's
step_time_s. Per worker count: their means over the steps after the first (which builds the
reference model), the wait fraction reward_wait_s / (rollout_s + reward_wait_s + update_s), and
images/s over the trainer's step time. The target: under 5% once there are enough workers.

The default sleep, 18 ms, gives one worker 16 x 18 = 0.29 s of scoring per step against about
0.2 s of trainer compute (a lightly loaded 2-core machine), so one worker cannot keep up and two
can; the split moves with the machine's load, which the JSON records.

    python bench/grpo.py [--steps 10 --workers 1,2 --sleep-ms 18]  ->  bench/results/grpo_cpu.json
"""

from __future__ import annotations

import os
import time

SLEEP_ENV = "MMDIT_BENCH_REWARD_SLEEP_MS"
REWARD = "mmdit.bench.grpo:slow_latent_target"
"""The reward workers import this module by its package path (the repo root is `mmdit`), so
nothing above `main` may import what a worker lacks (bench/common.py is imported in `main`)."""


def slow_latent_target(latents, prompts):
    """latent_target's score (target 0.5) after $MMDIT_BENCH_REWARD_SLEEP_MS ms per image."""
    from mmdit.consumer.rewards import LatentTarget

    time.sleep(latents.shape[0] * float(os.environ.get(SLEEP_ENV, "0")) / 1e3)
    return LatentTarget(0.5)(latents, prompts)


GPU_COMPARISON = (
    "The GPU comparison point: verl-omni publishes 0.51 images/GPU/s for Qwen-Image FlowGRPO on 4 "
    "H200. No GPU was available for this run, so no images/GPU/s figure was measured here: the "
    "figures above are a tiny model on a shared CPU with a sleeping reward, and show only how much "
    "of a trainer step waits on rewards, not throughput comparable to that number.")
STEP_FIGURES = ("rollout_s", "reward_wait_s", "update_s", "reward_s", "images")
TINY_GRPO = ["train.objective=grpo", "train.data_source=random", "train.grpo.width=32", "train.grpo.height=32",
             "train.grpo.sde_steps=4", "train.grpo.group_size=4", "train.grpo.prompts_per_step=4",
             "train.grpo.rollout_chunk=1", "train.grpo.reward_service=true", f"train.grpo.reward={REWARD}",
             "train.random_height=32", "train.random_width=32", "train.micro_batch_size=1",
             "train.tensorboard=false", "checkpoint.async_save=false", "optimizer.lr=1e-4"]


def main() -> None:
    import argparse
    import json
    import shutil
    import signal
    import statistics
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch
    from common import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="trainer steps per worker count (the first is not averaged)")
    ap.add_argument("--workers", default="1,2", help="reward worker counts, comma-separated, run in this order")
    ap.add_argument("--sleep-ms", type=float, default=18.0, help="the reward's sleep per image")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "grpo_cpu.json"))
    args = ap.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="mmdit_bench_grpo_"))
    # one thread per process: the trainer's compute is then the same whatever else the machine runs
    env = {**os.environ, SLEEP_ENV: str(args.sleep_ms), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "mmdit.launch.cli"]

    def wait_for(what: str, ready, procs, limit_s: float = 180.0):
        deadline = time.monotonic() + limit_s
        while not ready():
            dead = [p.args[3] for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"waiting for {what}: {'exited: ' + str(dead) if dead else 'timed out'} "
                                   f"(logs in {root})")
            time.sleep(0.2)

    def reward_members() -> int:
        try:
            status = json.loads((root / "svc" / "service.json").read_text())
        except (OSError, ValueError):
            return -1
        return sum(m.startswith("reward_") for m in status.get("rpc_members", []))

    from mmdit.cache.store import LatentCache

    g = torch.Generator().manual_seed(0)
    LatentCache(root / "cache").write([
        {"key": f"k{i}", "fingerprint": "bench_grpo", "bucket": (128, 128), "task": "t2i", "caption": "c",
         "source": "s", "latents": torch.randn(16, 16, 16, generator=g),
         "prompt_embeds": torch.randn(4, 64, generator=g)} for i in range(2)])
    logs = root / "logs"
    logs.mkdir()
    serve = subprocess.Popen([*cli, "serve", f"run.dir={root / 'svc'}", f"cache.dir={root / 'cache'}",
                              "service.host=127.0.0.1", "service.port=0", "service.producers=0"],
                             env=env, stdout=subprocess.PIPE, stderr=open(logs / "serve.log", "w"), text=True)
    workers: list[subprocess.Popen] = []
    configs = []
    try:
        serving = json.loads(serve.stdout.readline())  # its first stdout line, once it serves
        address = ["service.host=127.0.0.1", f"service.port={serving['port']}"]
        for n in counts:
            while len(workers) < n:
                workers.append(subprocess.Popen(
                    [*cli, "reward-worker", *address, f"train.grpo.reward={REWARD}"], env=env,
                    stderr=open(logs / f"worker-{len(workers)}.log", "w")))
            while len(workers) > n:
                workers.pop().send_signal(signal.SIGTERM)
            wait_for(f"{n} reward workers listed", lambda n=n: reward_members() == n, [serve, *workers])
            run = root / f"train_{n}"
            trainer = subprocess.Popen([*cli, "train", f"run.dir={run}", *TINY_GRPO, f"train.steps={args.steps}",
                                        *address], env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(logs / f"train-{n}.log", "w"))
            if trainer.wait(timeout=600) != 0:
                raise RuntimeError(f"mmdit train with {n} workers exited {trainer.returncode} (log in {logs})")
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            steps = [{"step": r["step"], "step_time_s": r["step_time_s"],
                      **{k: r["objective"][k] for k in STEP_FIGURES}} for r in records]
            timed = steps[1:] or steps  # the first step also builds the reference model
            mean = {k: statistics.fmean(s[k] for s in timed) for k in (*STEP_FIGURES, "step_time_s")}
            accounted = mean["rollout_s"] + mean["reward_wait_s"] + mean["update_s"]
            configs.append({
                "reward_workers": n,
                "mean": {k: round(v, 4) for k, v in mean.items()},
                "wait_fraction": round(mean["reward_wait_s"] / accounted, 4),
                "under_5_percent": mean["reward_wait_s"] / accounted < 0.05,
                "images_per_s": round(sum(s["images"] for s in timed) / sum(s["step_time_s"] for s in timed), 2),
                "reward_retries": records[-1]["objective"].get("reward_retries", 0.0),
                "dropped_samples": sum(r["objective"]["dropped_samples"] for r in records),
                "steps": [{k: round(v, 4) for k, v in s.items()} for s in steps]})
            print(f"{n} worker(s): " + json.dumps({k: configs[-1][k] for k in ("mean", "wait_fraction",
                                                                                "images_per_s")}), flush=True)
    finally:
        for p in [*workers, serve]:
            p.send_signal(signal.SIGTERM)
        for p in [*workers, serve]:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    shutil.rmtree(root)  # kept when a run failed: its logs
    result = {
        "device": "cpu: trainer and reward workers with one torch thread each (OMP_NUM_THREADS=1)",
        "setup": {"model": "the default tiny MMDiT (load_config([]).model)", "image_px": 32, "sde_steps": 4,
                  "prompts_per_step": 4, "group_size": 4, "rollout_chunk": 1, "reward": REWARD,
                  "reward_sleep_ms_per_image": args.sleep_ms, "steps": args.steps,
                  "averaged": "steps after the first (which also builds the reference model)"},
        "wait_fraction_definition": "reward_wait_s / (rollout_s + reward_wait_s + update_s); target < 0.05",
        "images_per_s_definition": "images rolled out / trainer step_time_s (metrics.jsonl), steps averaged",
        "configs": configs,
        "comment": GPU_COMPARISON,
    }
    write_results(result, Path(args.out), started, "python " + " ".join(["bench/grpo.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
