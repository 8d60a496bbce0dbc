"""Stopping processes (utils/processes.py): what processes.json records, and a start-up that a
signal interrupts wherever it is.

Real child processes stand in for producers: one finishes its stop at once and then takes long to
exit (as an interpreter that loaded torch does, seconds of CPU), one never stops.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from mmdit.utils.processes import ProcessTable, SignalStop, StopRequested, start, stop_all

CHILD = """
import sys, time
from mmdit.utils.processes import SignalStop
stop = SignalStop()
if sys.argv[1] == "stuck":
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while not stop.wait(0.05):
    pass
stop.restore()  # the stop is over; what follows is a slow exit
time.sleep(float(sys.argv[2]))
"""


def wait_ready(logs: list[Path], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() and "ready" in p.read_text() for p in logs):
        assert time.monotonic() < deadline, "the children never started"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_process_that_stopped_is_not_killed_while_it_exits_and_a_kill_says_why(tmp_path):
    table = ProcessTable(tmp_path)
    logs = [tmp_path / "exits.log", tmp_path / "stuck.log"]
    exits, stuck = (start([sys.executable, "-c", CHILD, mode, "4"], table, "worker", lambda pid: f"worker_{pid}",
                          log_path=log) for mode, log in zip(("exits", "stuck"), logs))
    try:
        wait_ready(logs)
        codes = stop_all([exits, stuck], table, timeout_s=2.0)
    finally:
        for p in (exits, stuck):
            if p.poll() is None:
                p.kill()
    rows = {r["pid"]: r for r in table.read()}
    # before: SIGKILLed at the 2-s stop timeout while it was only exiting, recorded as -9
    assert codes[exits.pid] == 0 and rows[exits.pid]["returncode"] == 0, rows[exits.pid]
    assert rows[exits.pid]["exiting"] and "killed" not in rows[exits.pid]
    assert rows[stuck.pid]["returncode"] == -signal.SIGKILL
    assert "SIGTERM" in rows[stuck.pid]["killed"] and "stop timeout (2 s)" in rows[stuck.pid]["killed"]


def _main_thread_sleeps(tid: int) -> bool:
    return Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"


def test_a_signal_interrupts_a_start_up_phase_blocked_in_a_read():
    """A phase that polls nothing (here a read that never returns, as from a FIFO) stops at the
    first signal; later signals only set the flags."""
    stop = SignalStop()
    r, w = os.pipe()
    tid = threading.get_native_id()

    def signal_once_blocked():
        deadline = time.monotonic() + 60
        while not _main_thread_sleeps(tid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        sender = threading.Thread(target=signal_once_blocked)
        started = time.monotonic()
        with pytest.raises(StopRequested) as stopped:
            with stop.interrupting():
                sender.start()
                os.read(r, 1)
        sender.join()
        assert stopped.value.signal_name == "SIGTERM" and stop.is_set() and time.monotonic() - started < 60
        os.kill(os.getpid(), signal.SIGTERM)  # after the phase: a flag, not an exception
        assert stop.wait(60) and not stop.forced
        with pytest.raises(StopRequested):  # a phase entered after a stop request does not start
            with stop.interrupting():
                pytest.fail("the phase ran")
    finally:
        for sig, handler in stop.previous.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)
