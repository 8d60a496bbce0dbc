"""The data service with real processes on loopback: `mmdit serve` (coordinator + producers) and
`mmdit consume` (DP consumers), over TensorPipe RPC; TP broadcast over gloo.

The cache is written with LatentCache.write (small random tensors, 3 buckets, t2i + edit). Every
delivered sequence is compared with the pure batch plan, so these tests check the service
delivers exactly the plan: under producer churn, with 1 or 3 producers, across a restart.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmdit.cache.store import LatentCache
from mmdit.config.service import ClientSettings
from mmdit.consumer.sample_log import read_samples
from mmdit.dataservice.plan import DataVersion, PlanSpec, SampleRef, Selection, plan_epoch
from mmdit.utils.processes import ServeProcess

pytestmark = pytest.mark.slow  # real processes

FP = "fp_test"
BUCKETS = [(64, 64), (64, 128), (128, 64)]
DP, MBS, SEED = 2, 2, 11
N_KEYS = 72


def make_records(n=N_KEYS, dim=32, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = BUCKETS[i % 3]
        edit = i % 4 == 0
        rec = {"key": f"s{i:04d}", "fingerprint": FP, "bucket": (h, w), "task": "edit" if edit else "t2i",
               "caption": f"caption {i}", "source": "a" if i % 2 else "b",
               "latents": torch.randn(16, h // 8, w // 8, generator=g),
               "prompt_embeds": torch.randn(3 + i % 7, dim, generator=g)}
        if edit:
            rec["cond_latents"] = torch.randn(16, 8, 8, generator=g)
        out.append(rec)
    return out


RECORDS = make_records()
BY_KEY = {r["key"]: r for r in RECORDS}


def expected_plan(epochs: int = 2) -> list:
    """The batches the service must deliver, from the pure plan (min batch = DP size)."""
    sel = Selection(SampleRef(r["key"], r["bucket"], r["task"], r["source"], (64, 64) if "cond_latents" in r else None)
                    for r in RECORDS)
    history = [DataVersion(0, 0, 0, task_weights={"t2i": 1.0, "edit": 1.0}, source_weights={})]
    return [b for e in range(epochs) for b in plan_epoch(PlanSpec(SEED, DP * MBS, DP), e, sel, history)]


PLAN = expected_plan()
STEPS = len(PLAN)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cache")
    LatentCache(path).write(RECORDS)
    return str(path)


def overrides(cache_dir, run_dir, **extra) -> list[str]:
    """For the service and its clients alike: it binds any free port and publishes it in run_dir,
    where they find it (no port chosen beforehand that another test's service could take)."""
    base = {"cache.dir": cache_dir, "run.dir": str(run_dir), "seed": SEED, "service.port": 0,
            "service.address_from": str(run_dir),
            "service.dp_size": DP, "train.micro_batch_size": MBS, "service.heartbeat_s": 0.5,
            "service.lease_timeout_s": 5, "service.rpc_timeout_s": 60, "service.join_timeout_s": 120,
            "service.consumer_timeout_s": 120, "service.shutdown_timeout_s": 20}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def consume(args: list[str], timeout: float = 400, wait: bool = True):
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "consume", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def samples(run_dir) -> list[dict]:
    """The complete lines of samples.jsonl (a consumer may be writing the last one)."""
    return read_samples(run_dir)


def wait_for_samples(run_dir, n: int, timeout: float = 300, proc=None) -> None:
    """Until n samples are logged; a consumer `proc` that exits first fails the wait with its output."""
    deadline = time.monotonic() + timeout
    while len(samples(run_dir)) < n:
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the consumer exited ({proc.returncode}) before {n} samples:\n{out[-2000:]}{err[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {n} samples logged in {timeout}s")
        time.sleep(0.05)


def sequence(run_dir, dp_rank: int) -> list[tuple]:
    rows = sorted((r for r in samples(run_dir) if r["dp_rank"] == dp_rank and r["tp_rank"] == 0),
                  key=lambda r: r["step"])
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "a step is missing or logged twice"
    return [(tuple(r["batch_id"]), tuple(r["keys"])) for r in rows]


def planned_sequence(dp_rank: int) -> list[tuple]:
    return [(b.batch_id, b.shard(dp_rank, DP)) for b in PLAN]


def producer_pids(run_dir) -> dict[str, int]:
    rows = json.loads((Path(run_dir) / "processes.json").read_text())
    return {r["name"]: r["pid"] for r in rows if r["role"] == "producer"}


def service_status(run_dir, timeout: float = 300) -> dict:
    """run.dir/service.json, which the coordinator writes every second (waits for the first)."""
    path, deadline = Path(run_dir) / "service.json", time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- churn and determinism


@pytest.fixture(scope="module")
def churn_run(cache_dir, tmp_path_factory):
    """3 producers, 2 DP consumers, 2 epochs; one producer SIGKILLed mid-epoch 0."""
    run_dir = tmp_path_factory.mktemp("churn")
    args = overrides(cache_dir, run_dir, **{"service.producers": 3, "service.shutdown_timeout_s": 60})
    serve = ServeProcess(args)
    try:
        # all three producers serve: none may still be starting when the short run begins
        deadline = time.monotonic() + 300
        while sum(p.get("alive", False) for p in service_status(run_dir)["producers"].values()) < 3:
            assert time.monotonic() < deadline, "three producers never joined"
            time.sleep(0.2)
        proc = consume(args + [f"train.steps={STEPS}", "train.log_samples=true", "service.step_time_s=0.08"],
                       wait=False)
        wait_for_samples(run_dir, 2 * 5)
        victim, pid = sorted(producer_pids(run_dir).items())[1]
        deadline = time.monotonic() + 300
        # killed once it has served a batch and while it holds leases (on a loaded machine it can
        # hold some long before it serves one)
        while not (any(r["producer"] == victim for r in samples(run_dir))
                   and service_status(run_dir)["producers"].get(victim, {}).get("held", 0) > 0):
            assert time.monotonic() < deadline, "the victim never served a batch while holding leases"
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        # read after the kill: no step the consumers had reached when it came is later than this
        killed_by_step = max(r["step"] for r in samples(run_dir))
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        code, stopped = serve.stop(timeout=300)
    finally:
        serve.kill()
    return {"dir": run_dir, "victim": victim, "killed_by_step": killed_by_step, "serve_code": code, "stopped": stopped,
            "summaries": [json.loads(line) for line in out.splitlines() if line.startswith("{")]}


@pytest.mark.timeout(900)
def test_exactly_once_under_producer_kill(churn_run):
    rows = samples(churn_run["dir"])
    for epoch in (0, 1):
        delivered = [k for r in rows if r["batch_id"][0] == epoch for k in r["keys"]]
        assert len(delivered) == len(set(delivered)), f"epoch {epoch}: a key was delivered twice"
        assert set(delivered) == set(BY_KEY), f"epoch {epoch}: keys lost"
    status = service_status(churn_run["dir"])
    assert status["counters"]["producers_lost"] >= 1 and status["counters"]["revoked"] >= 1
    assert not status["producers"][churn_run["victim"]]["alive"]
    assert sorted(s["steps"] for s in churn_run["summaries"]) == [STEPS] * DP
    served_by = {r["producer"] for r in rows}
    assert len(served_by) == 3, served_by  # all three served, the victim before it died
    # after its death, only batches already in a client's prefetch (plus the one in training) can be the victim's
    late = churn_run["killed_by_step"] + ClientSettings().prefetch + 1
    assert churn_run["victim"] not in {r["producer"] for r in rows if r["step"] > late}
    assert churn_run["serve_code"] == 0 and sorted(churn_run["stopped"]["producer_exit_codes"]) == [-9, 0, 0]


@pytest.mark.timeout(900)
def test_every_batch_has_one_bucket_shapes(churn_run):
    for r in samples(churn_run["dir"]):
        buckets = {BY_KEY[k]["bucket"] for k in r["keys"]}
        assert len(buckets) == 1
        (h, w), = buckets
        assert r["shape"] == [len(r["keys"]), 16, h // 8, w // 8]
        tasks = {BY_KEY[k]["task"] for k in r["keys"]}
        assert len(tasks) == 1 and (r["cond_shape"] is not None) == (tasks == {"edit"})


@pytest.fixture(scope="module")
def single_run(cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    args = overrides(cache_dir, run_dir, **{"service.producers": 1})
    serve = ServeProcess(args)
    try:
        done = consume(args + [f"train.steps={STEPS}", "train.log_samples=true"])
        assert done.returncode == 0, done.stderr[-3000:]
        serve.stop()
    finally:
        serve.kill()
    return run_dir


@pytest.mark.timeout(900)
def test_same_sequence_with_1_and_3_producers_equals_the_plan(churn_run, single_run):
    for dp_rank in range(DP):
        expected = planned_sequence(dp_rank)
        assert sequence(single_run, dp_rank) == expected
        assert sequence(churn_run["dir"], dp_rank) == expected


@pytest.mark.timeout(900)
def test_resume_from_saved_cursor_across_a_service_restart(cache_dir, tmp_path, single_run):
    k = 9
    for part, steps in (("first", k), ("rest", STEPS)):
        args = overrides(cache_dir, tmp_path, **{"service.producers": 1})
        serve = ServeProcess(args)  # a fresh coordinator each time: the cursor comes from the consumers
        try:
            done = consume(args + [f"train.steps={steps}", "train.log_samples=true"])
            assert done.returncode == 0, f"{part}: {done.stderr[-3000:]}"
        finally:
            serve.stop()
            serve.kill()
        state = json.loads((tmp_path / "consume_state_dp0.json").read_text())
        assert state["step"] == steps
    first = [s for s in samples(tmp_path) if s["step"] <= k]
    assert len(first) == k * DP  # the second run did not repeat the first k steps
    for dp_rank in range(DP):
        assert sequence(tmp_path, dp_rank) == sequence(single_run, dp_rank)


# ----------------------------------------------------------------------------- TP, joins, failures


@pytest.mark.timeout(900)
def test_tp_broadcast_gives_both_tp_ranks_the_same_tensors(cache_dir, tmp_path):
    args = overrides(cache_dir, tmp_path, **{"service.dp_size": 1})
    serve = ServeProcess(args)
    try:
        done = consume(args + ["parallel.tp=2", "train.steps=8", "train.log_samples=true"])
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        serve.stop()
        serve.kill()
    rows = samples(tmp_path)
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], {})[r["tp_rank"]] = r
    assert sorted(by_step) == list(range(1, 9))
    for ranks in by_step.values():
        assert set(ranks) == {0, 1}
        assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["keys"] == ranks[1]["keys"]
    assert len({r["digest"] for r in rows}) == 8  # different batches, not one repeated
    roles = [p["role"] for p in json.loads((tmp_path / "processes.json").read_text())]
    assert roles.count("consumer") == 2 and roles.count("producer") == 1


@pytest.mark.timeout(900)
def test_producer_joining_mid_run_gets_leases(cache_dir, tmp_path):
    """The only producer stops answering (SIGSTOP) mid-run, so the run can only finish through
    a producer that joins afterwards: no timing decides whether the joiner is needed."""
    args = overrides(cache_dir, tmp_path, **{"service.producers": 1, "service.prepare_depth": 2,
                                                          "service.lease_timeout_s": 3})
    serve = ServeProcess(args)
    joiner, stopped = None, None
    try:
        proc = consume(args + [f"train.steps={STEPS}", "train.log_samples=true", "service.step_time_s=0.02"],
                       wait=False)
        wait_for_samples(tmp_path, 2 * 3)
        (first_name, stopped), = producer_pids(tmp_path).items()
        os.kill(stopped, signal.SIGSTOP)
        joiner = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "producer", *args],
                                  env={**os.environ, "MMDIT_INCARNATION": "7"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        status = service_status(tmp_path)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        if joiner is not None:
            joiner.send_signal(signal.SIGTERM)
            joiner.wait(timeout=60)
        serve.stop()
        serve.kill()
    name = next(n for n in status["producers"] if n.endswith(f"_{joiner.pid}_7"))
    assert status["producers"][name]["leased_total"] > 0
    assert not status["producers"][first_name]["alive"]  # declared dead while stopped
    rows = samples(tmp_path)
    assert any(r["producer"] == name for r in rows)
    for dp_rank in range(DP):
        assert sequence(tmp_path, dp_rank) == planned_sequence(dp_rank)
    assert joiner.returncode == 0


@pytest.mark.timeout(900)
def test_lagging_rank_gets_batches_revoked_from_a_killed_producer(cache_dir, tmp_path):
    """DP rank 0 runs ahead until every producer slot holds batches only it has acked; the
    producer holding the oldest batch is killed; DP rank 1 starts afterwards and must still get
    every batch (the stall of the capacity-only lease rule)."""
    args = overrides(cache_dir, tmp_path, **{"service.producers": 3, "service.prepare_depth": 2})
    serve = ServeProcess(args)
    try:
        steps = [f"train.steps={STEPS}", "train.log_samples=true"]
        leader = consume(args + steps + ["service.dp_rank=0"], wait=False)
        deadline = time.monotonic() + 300
        while sum(len(p["seqs"]) for p in service_status(tmp_path)["producers"].values()) < 3 * 2:
            assert time.monotonic() < deadline, "the producers' slots never filled"
            time.sleep(0.1)
        holders = {n: min(p["seqs"]) for n, p in service_status(tmp_path)["producers"].items() if p["seqs"]}
        victim = min(holders, key=holders.get)
        assert holders[victim] == 0  # it holds the oldest batch, which rank 1 needs first
        os.kill(producer_pids(tmp_path)[victim], signal.SIGKILL)
        lagger = consume(args + steps + ["service.dp_rank=1"], wait=False)
        for proc in (leader, lagger):
            _, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, err[-3000:]
        # service.json is rewritten about every second: wait for the one that counts every ack
        status, deadline = service_status(tmp_path), time.monotonic() + 120
        while status["counters"]["acks"] < DP * STEPS:
            assert time.monotonic() < deadline, status["counters"]
            time.sleep(0.2)
            status = service_status(tmp_path)
    finally:
        serve.stop()
        serve.kill()
    assert status["counters"]["revoked"] >= 1, status["counters"]
    for dp_rank in range(DP):
        assert sequence(tmp_path, dp_rank) == planned_sequence(dp_rank)


@pytest.mark.timeout(900)
def test_consumer_fails_clearly_when_all_producers_are_gone(cache_dir, tmp_path):
    # the coordinator declares a silent producer dead (lease_timeout_s=5) well before the consumer
    # gives up (consumer_timeout_s), and no RPC timeout can pass for either; 30 s, not less: on a
    # loaded machine the producer's first batch can take longer than 12 s after the consumer starts
    args = overrides(cache_dir, tmp_path, **{"service.producers": 1, "service.consumer_timeout_s": 30,
                                                          "service.rpc_timeout_s": 600,
                                                          "service.prepare_depth": 1, "service.prefetch": 1})
    serve = ServeProcess(args)
    try:
        proc = consume(args + [f"train.steps={STEPS}", "train.log_samples=true", "service.step_time_s=0.1"],
                       wait=False)
        wait_for_samples(tmp_path, 2 * 2, proc=proc)
        for pid in producer_pids(tmp_path).values():
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - killed
        code, _ = serve.stop(timeout=60)  # a dead producer must not hang the shutdown
    finally:
        serve.kill()
    assert proc.returncode != 0
    assert "DataServiceError" in err and "0 producers alive" in err
    assert 6 < elapsed < 120  # consumer_timeout_s=30 from the last batch, plus shutting down; not an RPC timeout
    assert code == 0
