"""One data service per run directory.

A service's state lives in its run directory (control.json and control.token, which `mmdit ctl`
steers the job through, service.json, its rows in processes.json, its logs). A second `mmdit
serve` on the same directory would replace the first's control files, and delete them when it
exits, leaving the running job unsteerable. So `mmdit serve` holds an exclusive lock (flock) on
run.dir/service.lock for its whole life, taken before it writes anything else; a second one
exits 2 naming the holder. The kernel drops the lock when the holder exits, however it dies, so
a crashed service never blocks a restart. The file is never removed (a lock file replaced by a
new one no longer excludes anything); it holds the holder's pid, host and addresses.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "service.lock"


class ServiceLockHeld(Exception):
    """Another live service holds the run directory; the message names it."""


class ServiceLock:
    def __init__(self, run_dir: str | os.PathLike, fd: int):
        self.path, self.fd = Path(run_dir) / LOCK_FILE, fd
        self.holder: dict = {}

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, **holder) -> ServiceLock:
        """Lock `run_dir` for this process and record `holder` (addresses) beside its pid and
        host; ServiceLockHeld if another process holds it."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServiceLockHeld(f"run.dir {run_dir} is already served by {_describe(_holder(run_dir))}: stop that "
                                  "service first, or give this one another run.dir") from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(run_dir, fd)
        lock.record(pid=os.getpid(), host=socket.gethostname(), **holder)
        return lock

    def record(self, **fields) -> None:
        """Add `fields` (say the control URL, once known) to the holder's record, in place."""
        self.holder.update(fields)
        data = json.dumps(self.holder).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # no stale holder for whoever reads it next
            os.close(self.fd)  # closing the file drops the lock
            self.fd = -1


def _holder(run_dir: Path, attempts: int = 20) -> dict:
    """The holder's record; it writes it right after locking, so an empty one is retried briefly."""
    for _ in range(attempts):
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads((run_dir / LOCK_FILE).read_text())
            if isinstance(holder, dict) and holder.get("pid"):
                return holder
        time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another mmdit serve (it has not recorded itself yet)"
    where = ", ".join(f"{k} {holder[k]}" for k in ("rpc", "control") if holder.get(k))
    return f"mmdit serve pid {holder['pid']} on {holder.get('host', '?')}" + (f" ({where})" if where else "")
