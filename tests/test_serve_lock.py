"""One `mmdit serve` per run dir, its control files, and a stop during its start-up.

In-process: a control server removes only the files it wrote; the run dir's lock is exclusive and
names its holder. Real processes: a second service on a run dir exits 2 and leaves the first
steerable; a crashed service does not block the next; SIGTERM while serve starts stops it there.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from paused import paused
from test_faults import alive, wait_until

from mmdit.cache.store import LatentCache
from mmdit.config.service import ServiceConfig
from mmdit.dataservice.control import ControlServer
from mmdit.dataservice.coordinator import Coordinator
from mmdit.dataservice.plan import DataVersion, SampleRef, Selection
from mmdit.launch.service_lock import ServiceLock, ServiceLockHeld
from mmdit.utils.processes import ServeProcess, signal_group


def coordinator() -> Coordinator:
    refs = [SampleRef(f"k{i}", (256, 256), "t2i", "a") for i in range(8)]
    return Coordinator(Selection(refs), ServiceConfig(plan_ahead=8), 0, 1, 2, [DataVersion(0, 0, 0, task_weights={"t2i": 1.0})])


def test_a_control_server_removes_only_the_files_it_wrote(tmp_path):
    first = ControlServer(coordinator(), "127.0.0.1", 0, tmp_path)
    second = ControlServer(coordinator(), "127.0.0.1", 0, tmp_path)  # what a second service used to do
    try:
        first.close()
        assert json.loads((tmp_path / "control.json").read_text())["url"] == second.url
        assert (tmp_path / "control.token").read_text() == second.token
    finally:
        second.close()
    assert not (tmp_path / "control.json").exists() and not (tmp_path / "control.token").exists()


def test_the_run_dir_lock_is_exclusive_and_names_its_holder(tmp_path):
    lock = ServiceLock.acquire(tmp_path, rpc="127.0.0.1:29600")
    lock.record(control="http://127.0.0.1:1234")
    try:
        with pytest.raises(ServiceLockHeld) as held:
            ServiceLock.acquire(tmp_path, rpc="127.0.0.1:29601")
        assert f"pid {os.getpid()}" in str(held.value) and "127.0.0.1:29600" in str(held.value)
        assert "http://127.0.0.1:1234" in str(held.value)
    finally:
        lock.release()
    ServiceLock.acquire(tmp_path).release()  # free again


# ----------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    from test_data_service import make_records

    path = tmp_path_factory.mktemp("cache")
    LatentCache(path).write(make_records(12))
    return path


def serve_args(cache_dir, run_dir, **extra) -> list[str]:
    base = {"cache.dir": cache_dir, "run.dir": run_dir, "service.port": 0, "service.producers": 1,
            "service.heartbeat_s": 0.5, "service.join_timeout_s": 120, "service.shutdown_timeout_s": 1}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def serve(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def control_files(run_dir: Path) -> tuple[str, str]:
    return (run_dir / "control.json").read_text(), (run_dir / "control.token").read_text()


def producer_joined(run_dir: Path, pid: int) -> bool:
    """Whether producer `pid` is a live member for the service (run.dir/service.json)."""
    status = json.loads((run_dir / "service.json").read_text())
    return any(p["alive"] and f"_{pid}_" in name for name, p in status["producers"].items())


def rows(run_dir: Path, role: str) -> list[dict]:
    return [r for r in json.loads((run_dir / "processes.json").read_text()) if r["role"] == role]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_second_service_on_a_run_dir_exits_2_and_a_crashed_one_blocks_nothing(cache_dir, tmp_path):
    run = tmp_path / "service"
    first = ServeProcess(serve_args(cache_dir, run))
    try:
        before = control_files(run)
        second = serve(serve_args(cache_dir, run))
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-2000:]
        assert f"pid {first.proc.pid}" in err and first.info["control"] in err, err[-2000:]
        assert control_files(run) == before  # the first is still steered through them
        with urllib.request.urlopen(first.info["control"] + "/config", timeout=60) as reply:
            assert reply.status == 200
    finally:
        first.kill()  # SIGKILL to the service and its producer: a crash, nothing cleaned up
    assert json.loads((run / "address.json").read_text())["port"] == first.info["port"]  # stale, left behind

    third = ServeProcess(serve_args(cache_dir, run))  # the kernel released the crashed one's lock
    try:
        assert third.info["control"] != first.info["control"]
        assert json.loads((run / "address.json").read_text())["port"] == third.info["port"]  # its own now
        wait_until(lambda: producer_joined(run, third.info["producers"][0]), 300, "the producer to join", third.proc)
        code, stopped = third.stop(timeout=300)
    finally:
        third.kill()
    assert code == 0 and stopped["event"] == "stopped"
    assert not (run / "control.json").exists() and not (run / "control.token").exists()
    assert not (run / "address.json").exists()
    # a producer that stopped gracefully is recorded as such, however long its interpreter took to
    # exit after that (longer than this 1-s stop timeout; before, SIGKILLed and recorded -9)
    log = (run / "logs" / "producer-0.log").read_text()
    for row in rows(run, "producer"):
        if row["pid"] in third.info["producers"]:
            graceful = f"{row['name']} stopped (graceful)" in log
            assert (row["returncode"] == 0) if graceful else ("killed" in row), (row, log[-2000:])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_during_start_up_stops_serve_there_with_nothing_left(cache_dir, tmp_path):
    run = tmp_path / "service"
    proc = serve(serve_args(cache_dir, run))
    try:
        # the lock is the first thing serve takes; importing torch and starting the service follow
        wait_until(lambda: (run / "service.lock").exists() and f'"pid": {proc.pid}' in
                   (run / "service.lock").read_text(), 300, "serve to lock its run dir", proc)
        with paused(proc.pid):
            assert not select.select([proc.stdout], [], [], 0)[0], "serve finished starting before the signal"
            proc.send_signal(signal.SIGTERM)  # taken when it resumes, still starting
        out, err = proc.communicate(timeout=300)
    finally:
        signal_group(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGTERM during start-up" in err and '"serving"' not in out
    assert not (run / "control.json").exists() and not (run / "control.token").exists()
    assert not (run / "address.json").exists()
    producers = rows(run, "producer") if (run / "processes.json").exists() else []
    deadline = time.monotonic() + 60
    while any(alive(r["pid"]) for r in producers):
        assert time.monotonic() < deadline, "a producer outlived the service"
        time.sleep(0.1)
    ServiceLock.acquire(run).release()  # released
