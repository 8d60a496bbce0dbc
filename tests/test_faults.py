"""Faults and bad input: what a hostile user does to mmdit, and what must happen then.

Damaged caches (NaN bytes, truncated headers, garbage files), damaged checkpoints, a full disk,
Ctrl-C to a two-rank demo, a lost data service, open ports, and bad configs. Multi-process
findings are tested with real processes.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from paused import run_processes

from mmdit.cache.segment import DamagedRecord
from mmdit.cache.store import LatentCache
from mmdit.config.service import ProducerSettings
from mmdit.consumer.checkpoint import checkpoints, verify_checkpoint
from mmdit.dataservice.plan import PlannedBatch
from mmdit.dataservice.server import ProducerServer
from mmdit.utils.processes import ServeProcess, free_port

FP = "fp_faults"
DIM = 64  # the tiny model's joint_attention_dim: these records train it


def records(n=12, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"key": f"k{i:03d}", "fingerprint": FP, "bucket": (128, 128), "task": "t2i", "caption": f"c{i}",
             "source": "s", "latents": torch.randn(16, 16, 16, generator=g),
             "prompt_embeds": torch.randn(4 + i % 3, DIM, generator=g)} for i in range(n)]


def segment_of(cache_dir: Path) -> Path:
    (seg,) = Path(cache_dir).glob(f"{FP}/*/seg-*.safetensors")
    return seg


def poison(seg: Path, key: str) -> None:
    """Overwrite the first latent floats of `key` with NaN, in place (what a bad disk does)."""
    cache = LatentCache(seg.parent.parent.parent)
    s, i = cache._locate(key, FP)
    _, shape, offset = s.tensors["latents"]
    per = shape[1] * shape[2] * shape[3] * 4
    with open(seg, "r+b") as f:
        f.seek(offset + i * per)
        f.write(torch.full((8,), float("nan")).numpy().tobytes())


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


# ----------------------------------------------------------------------------- the latent cache


def test_nan_bytes_in_a_segment_are_caught_named_and_skipped(tmp_path):
    LatentCache(tmp_path).write(records())
    seg = segment_of(tmp_path)
    poison(seg, "k003")
    cache = LatentCache(tmp_path)
    found, problems = cache.read_available([f"k{i:03d}" for i in range(12)], FP)
    assert sorted(problems) == ["k003"] and len(found) == 11
    assert isinstance(problems["k003"], DamagedRecord) and str(seg) in str(problems["k003"])
    assert "k003" in str(problems["k003"]) and "checksum" in str(problems["k003"])
    with pytest.raises(DamagedRecord, match="k003"):
        cache.read("k003", FP)
    assert not cache.contains("k003", FP)  # a miss from now on: produce re-encodes it
    assert any("k003" in name for name in cache.damage)
    report = LatentCache(tmp_path).verify(FP)
    assert report["records"] == 12 and list(report["damaged_records"]) == [f"{seg} record k003"]
    repaired = LatentCache(tmp_path).verify(FP, repair=True)
    assert repaired["repaired_segments"] == 1 and Path(repaired["quarantined"][0]).exists()
    after = LatentCache(tmp_path)
    assert sorted(after.keys(FP)) == [f"k{i:03d}" for i in range(12) if i != 3]
    assert LatentCache(tmp_path).verify(FP)["damaged_records"] == {}


def test_truncated_headers_and_garbage_files_are_reported_never_fatal(tmp_path):
    from mmdit.dataservice.selection import build_selection

    cache = LatentCache(tmp_path)
    cache.write(records(6))
    cache.write(records(12)[6:])
    first, second = sorted(Path(tmp_path).glob(f"{FP}/*/seg-*.safetensors"))
    first.write_bytes(first.read_bytes()[:20])  # header cut short
    bucket = first.parent
    (bucket / "seg-garbage-000001.safetensors").write_bytes(os.urandom(3000))
    (bucket / "seg-huge-000001.safetensors").write_bytes(b"\xff" * 8 + b"{}")  # absurd header length
    (bucket / "notes.txt").write_text("not a segment")
    reader = LatentCache(tmp_path)
    assert sorted(reader.keys(FP)) == [f"k{i:03d}" for i in range(6, 12)]
    assert {str(first), str(bucket / "seg-garbage-000001.safetensors")} <= set(reader.damage)
    sel, counts = build_selection(reader, {0: FP})
    assert len(sel) == 6 and counts["damaged"] >= 3
    verify = cli("cache", "verify", str(tmp_path))
    assert verify.returncode == 1, verify.stderr
    report = json.loads(verify.stdout)
    assert str(first) in report["damaged_segments"] and str(bucket / "notes.txt") in report["damaged_segments"]
    repair = cli("cache", "verify", str(tmp_path), "--repair")
    assert repair.returncode == 0 and (tmp_path / "quarantine").is_dir()
    assert sorted(LatentCache(tmp_path).keys(FP)) == [f"k{i:03d}" for i in range(6, 12)]


def test_a_producer_serves_the_batch_without_a_damaged_record(tmp_path):
    LatentCache(tmp_path).write(records())
    poison(segment_of(tmp_path), "k001")
    server = ProducerServer(ProducerSettings(), LatentCache(tmp_path), FP, "producer_test", 1)
    try:
        batch = PlannedBatch(0, 0, (128, 128), "t2i", None, ("k000", "k001", "k002", "k003"), 0)
        shards = server.prepare(batch, 2, (0, 0))
        assert [k for s in shards for k in s["keys"]] == ["k000", "k002", "k003"]
        assert all(s["latents"].isfinite().all() for s in shards)
        two = PlannedBatch(0, 1, (128, 128), "t2i", None, ("k001", "k005"), 0)
        assert [s["keys"] for s in server.prepare(two, 2, (0, 1))] == [["k005"], ["k005"]]  # every rank busy
        assert server.counters["damaged"] == 2
    finally:
        server.close()


# ----------------------------------------------------------------------------- training


def test_a_non_finite_gradient_skips_the_update(tmp_path):
    from mmdit.config.loader import load_config
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    cfg = load_config(["parallel.backend=torch"])
    try:
        built = parallelize(cfg.model, cfg.parallel, optimizer=cfg.optimizer, seed=0)
        model, backend = built.model, built.backend
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        next(model.parameters()).grad[0] = float("nan")
        norm, stepped = backend.step()
        assert not stepped and not torch.isfinite(torch.tensor(norm))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        assert backend.step(skip=True)[1] is False  # a non-finite loss skips it too
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        assert backend.step()[1] is True
        assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    finally:
        destroy_parallel()


TRAIN = ["train.micro_batch_size=2", "train.random_height=64", "train.random_width=64", "optimizer.warmup_steps=1"]


def train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return cli("train", f"run.dir={run_dir}", *TRAIN, *overrides, timeout=timeout,
               env={**os.environ, "OMP_NUM_THREADS": "1"})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_diverging_training_stops_with_one_line_and_saves_nothing_non_finite(tmp_path):
    done = train(tmp_path, "train.steps=30", "optimizer.lr=1e30", "optimizer.grad_clip=0", "train.max_bad_steps=2",
                 "checkpoint.every=1")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "non-finite" in done.stderr and "Traceback" not in done.stderr
    rows = metrics(tmp_path)
    assert sum(r["skipped"] for r in rows) == 2 and rows[-1]["skipped"] and rows[-2]["skipped"]
    for path in checkpoints(tmp_path):  # whatever was saved verifies and holds finite weights
        assert verify_checkpoint(path) is None
        from safetensors.torch import load_file

        for f in (path / "model").glob("*.safetensors"):
            assert all(t.isfinite().all() for t in load_file(f).values())


@pytest.mark.slow
def test_resume_falls_back_to_the_newest_complete_checkpoint_and_never_regresses_silently(tmp_path):
    assert train(tmp_path, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=3").returncode == 0
    names = sorted(p.name for p in checkpoints(tmp_path))
    assert names == ["step_00000002", "step_00000003", "step_00000004"]  # retention: the newest 3
    (tmp_path / "checkpoints" / "step_00000004" / "trainer.json").unlink()
    shard = next((tmp_path / "checkpoints" / "step_00000003" / "model").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    (tmp_path / "checkpoints" / "step_00000002" / ".tmp-deadhost-1-abc-x.pt").write_bytes(b"killed save")
    resumed = train(tmp_path, "train.steps=5", "checkpoint.every=1", "checkpoint.keep=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "not resuming from" in log and "step_00000004" in log and "step_00000003" in log
    assert "resumed from" in log and "at step 2" in log
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]  # each step once
    assert not list((tmp_path / "checkpoints").rglob(".tmp-*"))
    # every checkpoint damaged: an error naming them, no fresh start, config.yaml untouched
    config = (tmp_path / "config.yaml").read_text()
    for path in checkpoints(tmp_path):
        (path / "data.json").write_text("{not json")
    failed = train(tmp_path, "train.steps=7", "optimizer.lr=0.123")
    assert failed.returncode == 1 and "CheckpointError" in failed.stderr and "step_00000005" in failed.stderr
    assert (tmp_path / "config.yaml").read_text() == config
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "small"
    if not _mount_tmpfs(run, "24m"):  # a checkpoint of the tiny model takes about 16 MB
        pytest.skip("cannot mount a tmpfs here; tests/test_atomic.py covers ENOSPC by simulation")
    try:
        done = train(run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=0")
        assert done.returncode == 1, done.stderr[-2000:]
        assert "no space left on device" in done.stderr and "Traceback" not in done.stderr
        assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
        assert [p.name for p in checkpoints(run)] == ["step_00000002"]  # the partial one is gone
        assert verify_checkpoint(run / "checkpoints" / "step_00000002") is None
        assert not list(run.rglob(".tmp-*"))  # the space came back
    finally:
        subprocess.run(["umount", "-l", str(run)], capture_output=True)


# ----------------------------------------------------------------------------- configs


@pytest.mark.slow
@pytest.mark.parametrize("args,words", [
    (["train", "model.num_layers=-1"], "model.num_layers must be >= 1"),
    (["train", "model.num_attention_heads=0"], "model.num_attention_heads must be >= 1"),
    (["train", "parallel.tp=3", "launch.nproc=3"], "must divide model.num_attention_heads"),
    (["train", "launch.nproc=3", "parallel.tp=2"], "must be a multiple of parallel.tp"),
    (["train", "checkpoint.init_from=/no/such/weights"], "does not exist"),
    (["serve", "service.port=70000"], "service.port must be in 1..65535"),
    (["train", "train.dtype=float16"], "train.dtype must be one of"),
    (["consume", "service.heartbeat_s=20"], "must be < service.lease_timeout_s"),
])
def test_bad_configs_are_one_line_exit_2_before_anything_starts(tmp_path, args, words):
    done = cli(*args, f"run.dir={tmp_path}")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert not (tmp_path / "processes.json").exists()  # nothing was started


@pytest.mark.slow
def test_runtime_failures_are_one_line_exit_1(tmp_path):
    # nothing will ever listen there: wait 1 s for it, not the 10 s a user gets
    no_service = cli("train", f"run.dir={tmp_path}", "train.data_source=service", f"service.port={free_port()}",
                     "service.join_timeout_s=1")
    assert no_service.returncode == 1 and "no data service at 127.0.0.1" in no_service.stderr
    assert "Traceback" not in no_service.stderr
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    bad = cli("convert", "from-diffusers", str(tmp_path / "weights"), str(tmp_path / "out"))
    assert bad.returncode != 0 and str(tmp_path / "weights") in bad.stderr and "Traceback" not in bad.stderr
    from mmdit.config.loader import load_config

    config = {**load_config([]).model.diffusers_config(), "_class_name": "QwenImageTransformer2DModel"}
    (tmp_path / "weights" / "config.json").write_text(json.dumps(config))
    (tmp_path / "weights" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{bad")
    corrupt = cli("convert", "from-diffusers", str(tmp_path / "weights"), str(tmp_path / "out"))
    assert corrupt.returncode != 0 and "diffusion_pytorch_model.safetensors" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr


# ----------------------------------------------------------------------------- processes and ports


def listening_sockets(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, "address:port") of every listening TCP socket of `pids` (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                continue
            hex_ip, hex_port = parts[1].split(":")
            raw = bytes.fromhex(hex_ip)
            if width == 8:
                ip = ".".join(str(b) for b in raw[::-1])
            else:  # four little-endian 32-bit words
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                ip = ":".join(b"".join(words)[i:i + 2].hex() for i in range(0, 16, 2))
            found.append((inodes[parts[9]], f"{ip}:{int(hex_port, 16)}"))
    return found


def run_pids(*run_dirs: Path) -> set[int]:
    pids = set()
    for d in run_dirs:
        path = Path(d) / "processes.json"
        if path.exists():
            pids |= {row["pid"] for row in json.loads(path.read_text())}
    return pids


def wait_until(predicate, timeout: float, what: str, while_running: subprocess.Popen | None = None) -> None:
    """Polls `predicate`; fails at once, with its stderr, if `while_running` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if while_running is not None and while_running.poll() is not None:
            err = while_running.stderr.read() if while_running.stderr else ""
            raise AssertionError(f"exited with {while_running.returncode} before {what}: {err[-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


LOOPBACK = ("127.", "0000:0000:0000:0000:0000:0000:0000:0001", "0000:0000:0000:0000:0000:ffff:7f")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_nothing_listens_beyond_loopback(tmp_path):
    """Coordinator store and agent, producer, TP consumers (gloo) and a two-rank trainer (its job
    store and gloo): every listening socket is on the loopback interface."""
    cache = tmp_path / "cache"
    LatentCache(cache).write(records(16))
    port = free_port()
    common = [f"cache.dir={cache}", f"service.port={port}", "service.producers=1", "train.micro_batch_size=1"]
    serve = ServeProcess([*common, f"run.dir={tmp_path / 'service'}"])
    consumer = trainer = None
    try:
        consumer = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "consume", *common,
                                     f"run.dir={tmp_path / 'consume'}", "parallel.tp=2", "train.steps=100000",
                                     "service.step_time_s=0.05", "train.log_samples=true"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        trainer = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={tmp_path / 'train'}",
                                    *TRAIN, "launch.nproc=2", "parallel.tp=2", "train.steps=100000"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: (tmp_path / "consume" / "samples.jsonl").exists(), 240, "the consumers' first batch",
                   while_running=consumer)
        wait_until(lambda: (tmp_path / "train" / "metrics.jsonl").exists(), 240, "the trainer's first step",
                   while_running=trainer)
        pids = run_pids(tmp_path / "service", tmp_path / "consume", tmp_path / "train")
        pids |= {serve.proc.pid, consumer.pid, trainer.pid}
        sockets = listening_sockets(pids)
        assert len({pid for pid, _ in sockets}) >= 5, sockets  # coordinator, producer, consumers, trainers
        outside = [(pid, where) for pid, where in sockets if not where.startswith(LOOPBACK)]
        assert not outside, f"listening beyond loopback: {outside}"
        assert any(where == f"127.0.0.1:{port}" for _, where in sockets)  # the coordinator's store
    finally:
        for proc in (consumer, trainer):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        for proc in (consumer, trainer):
            if proc is not None:
                proc.wait(timeout=120)
        serve.stop()
        serve.kill()


def returncodes(run_dir: Path, role: str) -> list:
    return [r["returncode"] for r in json.loads((run_dir / "processes.json").read_text()) if r["role"] == role]


def ctrl_c_twice(proc: subprocess.Popen, log: Path, stuck: list[int]) -> None:
    """SIGSTOP `stuck` (they can never finish stopping), Ctrl-C `proc`, and once its log says it
    is stopping, Ctrl-C again (two signals sent at once would arrive as one)."""
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "Ctrl-C again" in log.read_text(), 300, "the first Ctrl-C to be taken", proc)
    proc.send_signal(signal.SIGINT)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigint_to_the_demo_with_two_ranks_stops_every_process(tiny_encoders_dir, tmp_path):
    run = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "demo", f"run.dir={run}",
                             f"encoders.dir={tiny_encoders_dir}", "launch.nproc=2",
                             "parallel.tp=2", "train.steps=100000", "synth.num_samples=16", "checkpoint.every=1000",
                             # generous: the ranks finish their step and checkpoint on a loaded machine
                             "launch.stop_timeout_s=120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (run / "metrics.jsonl").exists(), 480, "the demo's first training step", while_running=demo)
        pids = run_pids(run, run / "service")
        assert len(pids) >= 6  # demo, stages, serve, 2 producers, launcher, 2 ranks
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=400)
        assert demo.returncode == 130, err[-2000:]
        wait_until(lambda: not any(alive(p) for p in pids), 60, "every process of the demo to exit")
    finally:  # a failed check must not leave a demo training for the rest of the suite
        for pid in run_pids(run, run / "service") | {demo.pid}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    rows = json.loads((run / "processes.json").read_text()) + json.loads((run / "service" / "processes.json").read_text())
    assert all(row["returncode"] is not None for row in rows), rows
    ranks = [row for row in rows if row["role"] == "trainer"]
    assert len(ranks) == 2 and all(row["returncode"] == 0 for row in ranks), (  # they checkpointed and left
        [(row["name"], row["returncode"]) for row in ranks], (run / "logs" / "train.out").read_text()[-3000:], (run / "logs" / "train.log").read_text()[-3000:])
    assert verify_checkpoint(checkpoints(run)[0]) is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_second_ctrl_c_kills_ranks_that_are_still_checkpointing(tmp_path):
    """The first SIGINT gives the ranks launch.stop_timeout_s (an hour here) to checkpoint; the
    second kills them at once. The ranks are SIGSTOPped, so they could never finish on their own."""
    run, log = tmp_path / "run", tmp_path / "launcher.err"
    with open(log, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run}",
                                     "launch.nproc=2", "train.steps=100000", "checkpoint.every=100000",
                                     "launch.stop_timeout_s=3600", "train.tensorboard=false"],
                                    stdout=subprocess.DEVNULL, stderr=err)
    ranks = []
    try:
        wait_until(lambda: (run / "metrics.jsonl").exists(), 480, "the first step", while_running=launcher)
        ranks = run_processes(run, "trainer")
        ctrl_c_twice(launcher, log, stuck=ranks)
        assert launcher.wait(timeout=300) == 130, log.read_text()[-2000:]
        wait_until(lambda: not any(alive(p) for p in ranks), 60, "the ranks to die")
    finally:
        for pid in [*ranks, launcher.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert returncodes(run, "trainer") == [-signal.SIGKILL, -signal.SIGKILL]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_ctrl_c_to_serve_kills_producers_that_do_not_stop(tmp_path):
    """`mmdit serve` gives its producers service.shutdown_timeout_s (an hour here) to leave; Ctrl-C
    again kills them at once. The producers are SIGSTOPped, so they could never leave."""
    cache, run, log = tmp_path / "cache", tmp_path / "service", tmp_path / "serve.err"
    LatentCache(cache).write(records(8))
    with open(log, "w") as err:
        serve = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "serve", f"cache.dir={cache}",
                                  f"run.dir={run}", f"service.port={free_port()}", "service.producers=2",
                                  "service.shutdown_timeout_s=3600"],
                                 stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        wait_until(lambda: len(run_pids(run)) == 3, 240,
                   "the service and its two producers", while_running=serve)
        ctrl_c_twice(serve, log, stuck=run_processes(run, "producer"))
        assert serve.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(serve.pid, signal.SIGKILL)
    assert returncodes(run, "producer") == [-signal.SIGKILL, -signal.SIGKILL]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_repeated_while_stopping_still_checkpoints_and_exits_0(tmp_path):
    """What a demo or a scheduler does: SIGTERM to the launcher's process group, which the
    launcher passes on to its ranks, so each rank gets the stop twice, the second at any moment of
    its exit. Here the whole group gets SIGTERM every 20 ms until the launcher is gone: no repeat
    may kill a stopping process with SIGTERM's default action."""
    run, log = tmp_path / "run", tmp_path / "launcher.err"
    with open(log, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run}",
                                     "launch.nproc=2", "train.steps=100000", "checkpoint.every=100000",
                                     "launch.stop_timeout_s=600", "train.tensorboard=false"],
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    ranks = []
    try:
        wait_until(lambda: (run / "metrics.jsonl").exists(), 480, "the first step", while_running=launcher)
        ranks = run_processes(run, "trainer")
        deadline = time.monotonic() + 600
        while launcher.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGTERM)
            time.sleep(0.02)
        assert launcher.wait(timeout=60) == 130, log.read_text()[-2000:]
        wait_until(lambda: not any(alive(p) for p in ranks), 60, "the ranks to exit")
    finally:
        for pid in [*ranks, launcher.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert returncodes(run, "trainer") == [0, 0], log.read_text()[-2000:]
    assert verify_checkpoint(checkpoints(run)[0]) is None


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_trainer_that_loses_the_service_exits_soon_after_its_timeout(tmp_path):
    TIMEOUT = 12  # noqa: N806  (waited out by design: short, yet 4 x TIMEOUT > TIMEOUT + the slack below)
    cache = tmp_path / "cache"
    LatentCache(cache).write(records(16))
    common = [f"cache.dir={cache}", f"service.port={free_port()}", "service.producers=1", "train.micro_batch_size=1",
              f"service.consumer_timeout_s={TIMEOUT}", "service.heartbeat_s=0.5", "service.lease_timeout_s=3"]
    serve = ServeProcess([*common, f"run.dir={tmp_path / 'service'}"])
    try:
        trainer = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={tmp_path / 'train'}",
                                    *common, "train.data_source=service", "train.steps=100000"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: (tmp_path / "train" / "metrics.jsonl").exists(), 240, "the first step", while_running=trainer)
    finally:
        serve.kill()  # the coordinator and its producers vanish
    gone = time.monotonic()
    _, err = trainer.communicate(timeout=300)
    elapsed = time.monotonic() - gone
    assert trainer.returncode == 1 and "Traceback" not in err, err[-2000:]
    # its timeout plus slack for a loaded machine; prefetch threads that each waited out their own
    # timeout took 4 x the timeout
    assert elapsed < TIMEOUT + 30, f"exited {elapsed:.0f}s after the service vanished"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_produce_without_the_edit_processor_fails_in_one_line(tiny_encoders_dir, tmp_path):
    import shutil

    encoders = tmp_path / "encoders"
    shutil.copytree(tiny_encoders_dir, encoders)
    shutil.rmtree(encoders / "processor")
    assert cli("synth", str(tmp_path / "shards"), "synth.num_samples=12").returncode == 0
    done = cli("produce", f"data.shards={tmp_path}/shards/*.tar", f"cache.dir={tmp_path / 'cache'}",
               f"encoders.dir={encoders}")
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    assert report["errors"]["encode_failed"] > 0 and report["encoded"] > 0  # text-to-image still cached
    lines = [line for line in done.stderr.splitlines() if line.startswith("mmdit produce:")]
    assert len(lines) == 1 and "could not be encoded" in lines[0] and "processor" in lines[0]
