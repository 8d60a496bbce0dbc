"""GRPO rewards on a reward service (consumer/reward_service.py, consumer/reward_worker.py).

Fast: the chunk bookkeeping driven through many seeded interleavings of answers, failures,
timeouts with late answers, workers dying, leaving and joining (every image's reward taken
exactly once, or NaN; a late answer never counts; a failed chunk never goes back to its worker);
the trainer-side handle over a fake transport; `submit` of the in-process rewards.
Slow: a bare coordinator, two `mmdit reward-worker` processes and a client, on loopback.
"""

import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mmdit.consumer.reward_service import ChunkBook, RemoteRewards
from mmdit.consumer.rewards import LatentTarget

REWARD = LatentTarget(0.5)


class _Fut:
    """A done-callback holder (the book's futures are concurrent ones; any with set_result works)."""

    def __init__(self) -> None:
        self.result, self.calls = None, 0

    def done(self) -> bool:
        return self.calls > 0

    def set_result(self, value) -> None:
        self.calls += 1
        assert self.calls == 1, "a request resolved twice"
        self.result = value.clone()


def _schedule(seed: int) -> dict:
    rng = random.Random(seed)
    clock = [0.0]
    book = ChunkBook(max_tries=rng.choice([1, 2, 3, 5]), wait_s=2.0, clock=lambda: clock[0])
    p_fail, p_kill = rng.choice([0.0, 0.1, 0.3]), rng.choice([0.0, 0.05, 0.15])
    listed = {f"reward_w_{i}_0": i + 1 for i in range(rng.randint(0, 3))}
    next_rank, started_with = [len(listed) + 1], len(listed)
    killed: set[str] = set()  # the sim's truth: dead processes (their calls fail)
    failed_by: dict[str, set] = {}  # (request, lo) -> workers that failed it
    out: dict[int, tuple] = {}  # attempt -> (send, chunk key), answers not yet delivered
    latest: dict[tuple, int] = {}  # chunk key -> its latest attempt
    taken: dict[tuple, int] = {}  # chunk key -> times its rewards were taken
    requests: dict[str, tuple] = {}  # id -> (latents, future)
    ever_failed = False

    def send_all():
        for s in book.dispatch():
            key = (s.request_id, s.lo, s.hi)
            assert s.worker not in failed_by.get(key, set()), (s, failed_by.get(key))  # retried elsewhere
            out[s.attempt], latest[key] = (s, key), s.attempt

    book.listed(dict(listed))
    for step in range(rng.randint(5, 60)):
        r = rng.random()
        if r < 0.25:
            rid = f"r{step}"
            latents = torch.randn(rng.randint(1, 9), 16, 2, 2, generator=torch.Generator().manual_seed(seed * 997 + step))
            requests[rid] = (latents, _Fut())
            book.listed(dict(listed))
            book.add(rid, latents.shape[0], requests[rid][1])
        elif r < 0.75 and out:
            attempt = rng.choice(sorted(out))
            s, key = out.pop(attempt)
            if s.worker in killed or rng.random() < p_fail:  # dead, or a timeout (the worker may answer late)
                ever_failed = True
                failed_by.setdefault(key, set()).add(s.worker)
                assert not book.answered(attempt, None, "timeout" if s.worker not in killed else "eof")
                if rng.random() < 0.5 and s.worker not in killed:  # the hung worker's late answer
                    assert not book.answered(attempt, REWARD(requests[s.request_id][0][s.lo:s.hi], []))
                book.listed({n: k for n, k in listed.items()})
            else:
                if book.answered(attempt, REWARD(requests[s.request_id][0][s.lo:s.hi], [])):
                    assert latest[key] == attempt, "an answer of a superseded attempt was taken"
                    taken[key] = taken.get(key, 0) + 1
                    assert taken[key] == 1, f"chunk {key} taken twice"
        elif r < 0.75 + p_kill and listed:
            victim = rng.choice(sorted(listed))
            killed.add(victim)
            ever_failed = True
            if rng.random() < 0.5:  # it left the list (a graceful leave); else a crashed entry stays
                del listed[victim]
        elif r < 0.95:
            listed[f"reward_w_{next_rank[0]}_0"] = next_rank[0]
            next_rank[0] += 1
            book.listed(dict(listed))
        else:
            clock[0] += rng.choice([0.5, 3.0])
        send_all()
    # drain: answer everything; with no live worker left, time runs out for the waiting chunks
    for _ in range(10_000):
        send_all()
        if not out and not book.waiting:
            break
        if out:
            attempt = sorted(out)[0]
            s, key = out.pop(attempt)
            if s.worker in killed:
                failed_by.setdefault(key, set()).add(s.worker)
                book.answered(attempt, None, "eof")
            elif book.answered(attempt, REWARD(requests[s.request_id][0][s.lo:s.hi], [])):
                taken[key] = taken.get(key, 0) + 1
                assert taken[key] == 1
        else:
            clock[0] += 3.0
    assert not out and book.pending() == 0
    nans = 0
    for rid, (latents, fut) in requests.items():
        assert fut.calls == 1, f"request {rid} never resolved"
        want = REWARD(latents, [])
        ok = ~fut.result.isnan()
        assert torch.equal(fut.result[ok], want[ok]), (rid, fut.result, want)
        nans += int((~ok).sum())
    c = book.counters
    assert c["nan_images"] == nans and c["accepted"] == sum(taken.values())
    assert c["accepted"] + c["failed_chunks"] == c["chunks"] and c["sent"] == len(latest) + c["retries"]
    if not ever_failed:  # no retry without a failure; with a worker from the start, no NaN either
        assert c["retries"] == 0 and (nans == 0 or not started_with)
    return c


def test_chunk_bookkeeping_takes_every_reward_once_over_many_interleavings():
    totals = {}
    for seed in range(400):
        for k, v in _schedule(seed).items():
            totals[k] = totals.get(k, 0) + v
    # the schedules reached every path: retries, late answers dropped, NaN chunks, and clean ones
    assert totals["retries"] > 50 and totals["late"] > 10 and totals["failed_chunks"] > 10, totals
    assert totals["accepted"] > 2 * totals["failed_chunks"], totals


class _FakeTransport:
    """Two workers on threads; `bad` fails every call at once, as a dead peer does."""

    def __init__(self, bad: str):
        self.bad, self.calls = bad, []

    def members(self):
        return {"reward_a_1_0": 1, "reward_b_2_0": 2}

    def call(self, worker, rank, request_id, latents, prompts, done):
        self.calls.append(worker)
        if worker == self.bad:
            done(None, "eof")
        else:
            threading.Thread(target=lambda: done(REWARD(latents, prompts), "")).start()


class _Settings:
    rpc_timeout_s, join_timeout_s, shutdown_timeout_s = 5.0, 5.0, 1.0


def test_remote_rewards_returns_at_once_and_retries_a_failed_chunk_elsewhere():
    transport = _FakeTransport(bad="reward_b_2_0")
    rewards = RemoteRewards(_Settings(), transport=transport)
    latents = torch.randn(6, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    try:
        futures = [rewards.submit(latents[i:i + 3], ["p"] * 3) for i in (0, 3)]
        got = torch.cat([f.result(timeout=30) for f in futures])
        assert torch.equal(got, REWARD(latents, []))
        assert rewards.retries >= 1 and "reward_b_2_0" in transport.calls
        assert rewards.counters["accepted"] == rewards.counters["chunks"]
    finally:
        rewards.close()


def test_in_process_rewards_submit_like_the_service():
    latents = torch.randn(4, 16, 2, 2)
    reward = LatentTarget(0.5)
    try:
        assert torch.equal(reward.submit(latents, []).result(timeout=30), reward(latents, []))
    finally:
        reward.close()


def test_a_reward_worker_scores_in_order_on_its_own_thread_and_refuses_beyond_its_queue():
    """consumer/reward_worker.py's handler: answers come from the scoring thread; a reward that
    raises gives NaN (the worker lives on); a full queue refuses at once; close fails what is queued."""
    from mmdit.consumer.reward_worker import RewardServer

    gate, seen = threading.Event(), []

    def reward(latents, prompts):
        seen.append(threading.current_thread().name)
        gate.wait(30)
        if prompts[0] == "raise":
            raise ValueError("no score")
        return REWARD(latents, prompts)

    server = RewardServer(reward, depth=2)
    latents = torch.randn(3, 16, 2, 2)
    first = server.score("r0", latents, ["ok"] * 3)
    deadline = time.monotonic() + 30
    while not seen:  # the scoring thread took r0; two more fill the queue, a fourth is refused
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = [server.score("r1", latents, ["raise"] * 3), server.score("r2", latents, ["ok"] * 3)]
    refused = server.score("r3", latents, ["ok"] * 3)
    assert refused.done() and not first.done()
    with pytest.raises(RuntimeError, match="refused"):
        refused.wait()
    gate.set()
    assert torch.equal(first.wait(), REWARD(latents, [])) and queued[0].wait().isnan().all()
    assert torch.equal(queued[1].wait(), REWARD(latents, [])) and seen == ["reward-scoring"] * 3
    assert server.counters == {"requests": 3, "images": 9, "failures": 3, "refused": 1}
    gate.clear()
    server.score("r4", latents, ["ok"] * 3)
    late = server.score("r5", latents, ["ok"] * 3)
    threading.Timer(0.2, gate.set).start()
    server.close()
    with pytest.raises(RuntimeError, match="stopping"):
        late.wait()


# ----------------------------------------------------------------------------- real processes

MEMBERS = Path(__file__).with_name("reward_members.py")


def _wait_for(path: Path, procs: list, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"waiting for {path.name}; exited: {dead}"
        time.sleep(0.05)


@pytest.mark.slow
def test_reward_workers_over_rpc_score_exactly_once_through_a_crash(tmp_path):
    """A bare coordinator, two `mmdit reward-worker` processes and a client: rewards equal the
    local ones; worker B SIGKILLs itself on a request (every image still scored exactly once,
    one retry at least); A stops on SIGTERM (leaves, exit 0, counters logged); with no worker
    left the next request resolves NaN within the wait, not hanging."""
    from mmdit.utils.processes import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(MEMBERS.parent), os.environ.get("PYTHONPATH", "")])}
    py = [sys.executable]
    procs = [subprocess.Popen([*py, str(MEMBERS), "host", str(port), str(tmp_path)], env=env)]
    try:
        _wait_for(tmp_path / "host.joined", procs)
        for w in ("a", "b"):
            with open(tmp_path / f"worker_{w}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [*py, "-m", "mmdit.launch.cli", "reward-worker", "service.host=127.0.0.1", f"service.port={port}",
                     "service.heartbeat_s=0.5", "train.grpo.reward=reward_fns:dies_when_told"],
                    env={**env, "REWARD_DIE_WHEN": str(tmp_path / f"die_{w}")}, stderr=log))
        client = subprocess.Popen([*py, str(MEMBERS), "client", str(port), str(tmp_path)], env=env)
        procs.append(client)
        _wait_for(tmp_path / "crash.done", [procs[0], procs[1], client])
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=60) == 0
        (tmp_path / "a.gone").touch()
        assert client.wait(timeout=150) == 0
        result = json.loads((tmp_path / "client.json").read_text())
    finally:
        (tmp_path / "stop").touch()
        for p in procs[1:]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    both, crash, none = result["both"], result["crash"], result["none"]
    assert both["exact"] and both["counters"]["retries"] == 0 and both["workers_used"] == 2, both
    assert crash["exact"] and crash["counters"]["retries"] >= 1, crash
    assert crash["counters"]["accepted"] == crash["counters"]["chunks"] and crash["died"] == ["b"], crash
    assert none["all_nan"] and none["seconds"] < none["limit_s"] + 10 and none["died"] == ["b"], none
    assert none["counters"]["nan_images"] == 4, none
    stopped = (tmp_path / "worker_a.log").read_text()
    counters = re.search(r"stopped \(graceful\); counters (\{.*\})", stopped)
    assert counters and ast.literal_eval(counters[1])["images"] >= 6, stopped[-2000:]  # its crash-phase chunk and B's, retried
