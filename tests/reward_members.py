"""Processes for tests/test_reward_service.py's reward service on loopback, one role each.

`python reward_members.py ROLE PORT DIR`: `host` creates a bare RPC group (rank 0, the
coordinator's name, no coordinator handler) and stays until DIR/stop exists; `client` waits for
two reward workers (`mmdit reward-worker ... train.grpo.reward=reward_fns:dies_when_told`, each
with its own $REWARD_DIE_WHEN=DIR/die_a|die_b) and writes DIR/client.json with three phases:
`both` (three requests on both workers), `crash` (B told to die, one request), then writes
DIR/crash.done and waits for DIR/a.gone (the test stops A with SIGTERM), and `none` (one request
that no worker is left to score).
"""

import json
import sys
import time
from pathlib import Path

import torch

from mmdit.config.service import ClientSettings
from mmdit.consumer.reward_service import RemoteRewards
from mmdit.consumer.rewards import LatentTarget
from mmdit.consumer.text_eval.prompts import TextPrompt
from mmdit.dataservice import rpc

WAIT_S = 4.0  # the client's service.join_timeout_s: how long a chunk waits for a live worker


def phase(rewards: RemoteRewards, out: Path, sizes: list[int], seed: int) -> dict:
    before = rewards.counters
    latents = [torch.randn(n, 16, 4, 4, generator=torch.Generator().manual_seed(seed + i)) for i, n in enumerate(sizes)]
    prompts = [[TextPrompt(f"{i}_{j}", "p", (), "en", "single_line") for j in range(n)] for i, n in enumerate(sizes)]
    started = time.monotonic()
    futures = [rewards.submit(x, p) for x, p in zip(latents, prompts)]
    got = [f.result(timeout=120) for f in futures]
    seconds = time.monotonic() - started
    want = [LatentTarget(0.5)(x, p) for x, p in zip(latents, prompts)]
    return {"exact": all(torch.equal(g, w) for g, w in zip(got, want)),
            "all_nan": all(bool(g.isnan().all()) for g in got),
            "seconds": seconds, "limit_s": WAIT_S,
            "counters": {k: v - before[k] for k, v in rewards.counters.items()},
            "workers_used": sum(w.taken > 0 for w in rewards.book.workers.values()),
            "died": [w for w in ("a", "b") if (out / f"die_{w}.died").exists()]}


def main(role: str, port: int, out: Path) -> None:
    if role == "host":
        rpc.join(rpc.COORDINATOR, "127.0.0.1", port, rank=0, rpc_timeout_s=60, join_timeout_s=60)
        (out / "host.joined").touch()
        while not (out / "stop").exists():
            time.sleep(0.05)
        rpc.leave(graceful=False)
        return
    settings = ClientSettings(host="127.0.0.1", port=port, join_timeout_s=WAIT_S, rpc_timeout_s=30)
    rewards = RemoteRewards(settings)
    try:
        deadline = time.monotonic() + 120
        while sum(m.startswith("reward_") for m in rpc.listed_members()) < 2:
            assert time.monotonic() < deadline, f"two reward workers never joined: {rpc.listed_members()}"
            time.sleep(0.1)
        result = {"both": phase(rewards, out, [4, 4, 4], 0)}
        (out / "die_b").touch()
        result["crash"] = phase(rewards, out, [6], 10)
        (out / "crash.done").touch()
        while not (out / "a.gone").exists():
            assert time.monotonic() < deadline + 120, "worker A was never stopped"
            time.sleep(0.05)
        result["none"] = phase(rewards, out, [4], 20)
    finally:
        rewards.close()
    (out / "client.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
