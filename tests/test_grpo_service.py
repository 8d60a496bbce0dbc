"""GRPO training against the reward service, as real processes (`mmdit train` with
train.grpo.reward_service=true, `mmdit reward-worker`s, a bare RPC host from reward_members.py).

Both runs start together in one module fixture, so each test waits on a run already under way:
- a reward worker SIGKILLed mid-run: every step still scores every image of every group;
- the latent target learned on the service, measured on held-out prompts before and after.
"""

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmdit.config.loader import load_config

MEMBERS = Path(__file__).with_name("reward_members.py")
SMALL = ["train.objective=grpo", "train.grpo.width=32", "train.grpo.height=32", "train.grpo.sde_steps=4",
         "train.random_height=32", "train.random_width=32", "train.micro_batch_size=1", "train.tensorboard=false",
         "checkpoint.async_save=false", "train.grpo.reward_service=true"]
KILL_STEPS, GROUP, PROMPTS = 8, 4, 2
DIES = "train.grpo.reward=reward_fns:dies_when_told"  # the workers score with it; the trainer only logs its name
TARGET = ["train.grpo.reward=latent_target", "train.grpo.latent_target=3"]  # the worker's reward
LEARN = [*TARGET, "train.grpo.group_size=8", "train.grpo.prompts_per_step=2", "train.grpo.kl_beta=0.01",
         "optimizer.lr=3e-3", "optimizer.warmup_steps=0", "optimizer.lr_schedule=constant"]
LEARN_STEPS = 16
TRAIN_SEED, HELD_OUT_SEED = 0, 7  # no encoders.dir: a prompt's embedding is keyed by (seed, its index)


def _prompts(path: Path, words: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"a sign that says {w}", "target_texts": [w], "language": "en",
                                       "kind": "single_line"}) + "\n"
                            for w in words))
    return path


def _wait_until(what: str, ready, procs: list, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"waiting for {what}; exited: {dead}"
        time.sleep(0.05)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Scenario:
    """One bare RPC host, its reward workers and one `mmdit train` on it, in `root`."""

    def __init__(self, root: Path, workers: dict[str, list[str]], train: list[str]):
        from mmdit.utils.processes import free_port

        root.mkdir()
        self.root, self.run, self.procs = root, root / "run", []
        port = free_port()
        py = [sys.executable]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(MEMBERS.parent), os.environ.get("PYTHONPATH", "")])}
        self.host = self._start([*py, str(MEMBERS), "host", str(port), str(root)], "host")
        address = ["service.host=127.0.0.1", f"service.port={port}", "service.heartbeat_s=0.5"]
        self.workers = {name: self._start([*py, "-m", "mmdit.launch.cli", "reward-worker", *address, *args],
                                          f"worker_{name}", env={"REWARD_DIE_WHEN": str(root / f"die_{name}")})
                        for name, args in workers.items()}
        self.trainer = self._start([*py, "-m", "mmdit.launch.cli", "train", f"run.dir={self.run}", *address,
                                    *SMALL, *train], "trainer")

    def _start(self, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "w") as log:
            p = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def finish(self, timeout: float = 300) -> int:
        """The trainer's exit status once it ends (the workers and the host still up)."""
        _wait_until("the trainer", lambda: self.trainer.poll() is not None, [self.host], timeout)
        return self.trainer.returncode

    def stop(self) -> None:
        (self.root / "stop").touch()
        for p in self.procs:
            if p.poll() is None and p is not self.host:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both scenarios at once (independent: their own host, port, workers and trainer)."""
    tmp = tmp_path_factory.mktemp("grpo_service")
    train_set = _prompts(tmp / "train.jsonl", ["north", "river", "stone", "lamp", "cloud", "seven"])
    held_out = _prompts(tmp / "held_out.jsonl", ["amber", "forest", "violin", "harbor"])
    started = []
    try:
        # B runs dies_when_told: once die_b exists it SIGKILLs itself on the request it gets (mid-run, mid-chunk)
        started.append(Scenario(tmp / "kill", {w: [DIES] for w in "ab"},
                                [DIES, f"train.steps={KILL_STEPS}", f"train.grpo.group_size={GROUP}",
                                 f"train.grpo.prompts_per_step={PROMPTS}", "train.grpo.rollout_chunk=1"]))
        started.append(Scenario(tmp / "learn", {"a": TARGET},
                                [f"train.steps={LEARN_STEPS}", f"train.grpo.prompts={train_set}", f"seed={TRAIN_SEED}",
                                 *LEARN]))
        yield {"kill": started[0], "learn": started[1], "held_out": held_out}
    finally:
        for s in started:
            s.stop()


@pytest.mark.slow
def test_a_reward_worker_sigkilled_mid_run_costs_no_group(runs):
    """Worker B dies on a request after the first step: its chunk goes to A, and every step
    still has all its images scored (nothing dropped, no group skipped, no image counted twice)."""
    s = runs["kill"]
    _wait_until("the first step", lambda: len(_records(s.run)) >= 1, [s.trainer, s.host])
    (s.root / "die_b").touch()
    assert s.finish() == 0, s.log("trainer")[-3000:]
    assert s.workers["b"].wait(timeout=60) == -9 and (s.root / "die_b.died").exists()
    assert (s.run / "summary.json").is_file()
    records = _records(s.run)
    assert [r["step"] for r in records] == list(range(1, KILL_STEPS + 1)), [r["step"] for r in records]
    for r in records:
        o = r["objective"]
        assert o["dropped_samples"] == 0 and o["skipped_groups"] == 0, (r["step"], o)
        assert o["images"] == PROMPTS * GROUP, (r["step"], o)
    log = s.log("trainer")
    counters = re.search(r"remote rewards \(.*?\): (\{.*\})", log)
    assert counters, log[-3000:]
    c = ast.literal_eval(counters[1])
    # each chunk's rewards taken once: none failed, none twice, B's lost one retried on A
    assert c["accepted"] == c["chunks"] and c["failed_chunks"] == 0 and c["nan_images"] == 0, c
    assert c["retries"] >= 1 and c["sent"] == c["chunks"] + c["retries"], c
    s.workers["a"].terminate()
    assert s.workers["a"].wait(timeout=60) == 0
    a = re.search(r"stopped \(graceful\); counters (\{.*\})", s.log("worker_a"))
    assert a and ast.literal_eval(a[1])["images"] > KILL_STEPS * PROMPTS * GROUP // 2, s.log("worker_a")[-2000:]


def _held_out_rewards(prompts: Path, weights: Path | None) -> torch.Tensor:
    """The latent-target rewards of one rollout over the held-out prompts (in process, the same
    reward the worker computes), with the initial weights (None) or a checkpoint's."""
    from mmdit.consumer.grpo_objective import GrpoObjective
    from mmdit.model.checkpoint import load_model
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    cfg = load_config([*SMALL, *LEARN, f"seed={TRAIN_SEED}"])
    held = load_config([*SMALL, *LEARN, "train.grpo.reward_service=false", f"train.grpo.prompts={prompts}",
                        "train.grpo.prompts_per_step=4", f"seed={HELD_OUT_SEED}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = parallelize(cfg.model, cfg.parallel, dtype=cfg.train.dtype, optimizer=None, seed=cfg.seed,
                            device="cpu")
        if weights is not None:
            load_model(built.model, weights)
        objective = GrpoObjective(held, built.plan)
        try:
            rollout = objective.rollout(built.model, step=0, first_index=0)
            return torch.cat([objective.rewards_of(rollout, c).reshape(-1) for c in rollout.chunks])
        finally:
            objective.close()
    finally:
        destroy_parallel()
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_grpo_on_the_reward_service_learns_and_generalizes_to_held_out_prompts(runs):
    from mmdit.consumer.checkpoint import checkpoint_dir

    s = runs["learn"]
    before = _held_out_rewards(runs["held_out"], None)  # while the run trains
    assert s.finish() == 0, s.log("trainer")[-3000:]
    after = _held_out_rewards(runs["held_out"], checkpoint_dir(s.run, LEARN_STEPS) / "model")
    curve = [r["objective"]["reward_mean"] for r in _records(s.run)]
    assert len(curve) == LEARN_STEPS
    spread = float(before.std())
    result = {"steps": LEARN_STEPS, "train_reward_mean": curve, "held_out_before": float(before.mean()),
              "held_out_after": float(after.mean()), "held_out_std_before": spread,
              "held_out_std_after": float(after.std()), "held_out_images": before.numel()}
    if os.environ.get("MMDIT_WRITE_RESULTS") == "1":
        out = Path(__file__).parents[1] / "bench" / "results" / "grpo_learning_curve.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
    assert not before.isnan().any() and not after.isnan().any()
    assert sum(curve[-4:]) / 4 > sum(curve[:4]) / 4 + 0.5, result  # it learned on its training prompts
    # and held-out prompts (embeddings never trained on) score clearly better than before training
    assert float(after.mean()) > float(before.mean()) + 3 * spread, result
