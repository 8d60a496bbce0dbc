"""What the reward service costs a trainer: `RemoteRewards.submit` and its round trip.

This process hosts a bare RPC group (rank 0, as the coordinator would) and starts `--workers`
`mmdit reward-worker` processes scoring `latent_target` (so the figures are the service's own
cost, not a reward's); then, for GRPO requests of 16 images at latent sides 32 (256 px) and 128
(1024 px), it times `--rounds` requests one after another: how long `submit` takes to return
(what the trainer's rollout waits), the round trip to the rewards, and the same reward computed
in this process.

    python bench/reward_service.py [--workers 2 --rounds 20]  ->  bench/results/reward_service.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from mmdit.config.service import ClientSettings
from mmdit.consumer.reward_service import RemoteRewards
from mmdit.consumer.rewards import LatentTarget
from mmdit.dataservice import rpc
from mmdit.utils.processes import free_port

RESULTS = Path(__file__).parent / "results"


def measure(rewards: RemoteRewards, side: int, rounds: int) -> dict:
    latents, prompts = torch.randn(16, 16, side, side), ["p"] * 16
    local = LatentTarget(0.5)
    assert torch.equal(rewards.submit(latents, prompts).result(), local(latents, prompts))  # warm, and right
    submit, trip, here = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        fut = rewards.submit(latents, prompts)
        submit.append(time.perf_counter() - started)
        fut.result()
        trip.append(time.perf_counter() - started)
        started = time.perf_counter()
        local(latents, prompts)
        here.append(time.perf_counter() - started)
    ms = lambda xs: round(1e3 * statistics.median(xs), 3)  # noqa: E731
    return {"latent_side": side, "images": 16, "MiB": latents.numel() * 4 / 2**20, "submit_ms": ms(submit),
            "round_trip_ms": ms(trip), "local_ms": ms(here)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    port = free_port()
    rpc.join(rpc.COORDINATOR, "127.0.0.1", port, rank=0)
    workers = [subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "reward-worker", "service.host=127.0.0.1",
                                 f"service.port={port}", "train.grpo.reward=latent_target"],
                                stderr=subprocess.DEVNULL) for _ in range(args.workers)]
    rewards = RemoteRewards(ClientSettings(host="127.0.0.1", port=port))
    try:
        deadline = time.monotonic() + 120
        while sum(m.startswith("reward_") for m in rpc.listed_members()) < args.workers:
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "workers did not join"
            time.sleep(0.1)
        rows = [measure(rewards, side, args.rounds) for side in (32, 128)]
    finally:
        rewards.close()
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=60)
        rpc.leave(graceful=False)
    result = {"workers": args.workers, "rounds": args.rounds, "rows": rows, "retries": rewards.retries,
              "host": platform.node(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reward_service.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
