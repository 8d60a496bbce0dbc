"""SIGSTOP processes for the length of a block.

A run paced by `service.step_time_s` keeps its pace on a loaded machine while a test's own
subprocesses (a `mmdit ctl` call) crawl; pausing the run while the test acts makes "the change
lands mid-run" an event instead of a race."""

import contextlib
import json
import os
import signal
from pathlib import Path


def run_processes(run_dir, role: str) -> list[int]:
    """Pids of a run's `role` processes, from its processes.json (none when it has no table)."""
    path = Path(run_dir) / "processes.json"
    if not path.exists():
        return []
    return [row["pid"] for row in json.loads(path.read_text()) if row["role"] == role]


@contextlib.contextmanager
def paused(*pids: int):
    stopped = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
