"""Local process management: start, record and stop the processes of a run on this machine.

Every process a local launcher starts is recorded in `run.dir/processes.json` (role, name, pid,
host, start time, and the exit code once known), so an operator or a test can find and signal
any of them. A row also names the pid space its pid belongs to (`pidspace`: the kernel's boot id
and pid namespace): only a process in the same pid space can judge whether that pid lives
(`is_local`); rows of other hosts (or containers) are theirs to reconcile. Several launchers (`mmdit serve`, `mmdit consume`) may share one run directory: the
file is updated under an exclusive lock and replaced atomically.

A stop records what happened: a process the launcher had to SIGKILL gets `"killed"` (when and
why) beside its exit code. A process started with `start` announces when its stop is over and
only its exit remains (`"exiting"`, from `SignalStop.restore`): tearing down an interpreter that
loaded torch takes seconds of CPU, and killing it then would record a clean stop as -9.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mmdit.utils.atomic import atomic_write_json, pid_alive

PROCESSES = "processes.json"
TABLE_ENV = "MMDIT_PROCESS_TABLE"
"""Set by `start`: the directory whose processes.json has the child's row."""
EXIT_GRACE_S = 30.0
"""How long a process that announced its exit may take to end, beyond the stop timeout, before
it is killed anyway (its teardown hangs)."""


class ProcessTable:
    """run.dir/processes.json: a list of {role, name, pid, host, started, returncode}."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / PROCESSES

    @contextlib.contextmanager
    def _locked(self):
        with open(self.dir / f".{PROCESSES}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> list[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return []

    def _write(self, rows: list[dict]) -> None:
        atomic_write_json(self.path, rows, fsync=False)

    def add(self, role: str, name: str, pid: int, **extra) -> None:
        row = {"role": role, "name": name, "pid": pid, "host": socket.gethostname(), "pidspace": pidspace(),
               "started": time.time(), "returncode": None, **extra}
        with self._locked():
            self._write(_reconciled(self.read()) + [row])

    def reconcile(self) -> list[dict]:
        """Mark rows of this pid space whose process is gone without a recorded exit code (it was
        killed with its launcher, say) as `"gone": true`; returns the rows."""
        with self._locked():
            rows = _reconciled(self.read())
            self._write(rows)
            return rows

    def set_returncode(self, pid: int, returncode: int | None, **extra) -> None:
        """Record the exit code of `pid` (once), with `extra` fields (e.g. why it was killed)."""
        self._update(pid, returncode=returncode, **extra)

    def _update(self, pid: int, **fields) -> None:
        """Set `fields` on the row of live process `pid` (no exit code yet), if there is one."""
        with self._locked():
            rows = self.read()
            for row in rows:
                if row["pid"] == pid and row.get("returncode") is None:
                    row.update(fields)
            self._write(rows)

    def exiting(self) -> set[int]:
        """Pids of processes that announced their exit (`announce_exit`) and have no exit code yet."""
        return {r["pid"] for r in self.read() if r.get("exiting") and r.get("returncode") is None}


def announce_exit() -> None:
    """This process is done (its stop included) and only exits now: tell the launcher that
    started it (`start`), which then gives it EXIT_GRACE_S more instead of killing it at its stop
    timeout. Best effort: a process whose launcher keeps no table just exits."""
    directory = os.environ.get(TABLE_ENV)
    if directory:
        with contextlib.suppress(OSError, ValueError):
            ProcessTable(directory)._update(os.getpid(), exiting=time.time())


def ignore_repeated_sigterm() -> None:
    """Called by a stopping process that starts no more children (they would inherit the ignore):
    a later SIGTERM repeats the same request (a launcher passes on the SIGTERM its process group
    already got) and must not kill it on the way out. Ignored rather than handled, because
    interpreter teardown puts SIGTERM's default action back for every Python-level handler."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequested(KeyboardInterrupt):
    """Raised by SignalStop inside `interrupting()`: a signal came while the process started."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


class SignalStop:
    """Set by SIGINT and SIGTERM; a second SIGINT (Ctrl-C again) also sets `forced`. Plain flags,
    polled: a signal handler must take no lock (`threading.Event.set` from a handler deadlocks
    when the main thread is inside `Event.wait`, holding the event's lock). Inside
    `interrupting()` the first signal also raises StopRequested."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.requested = False
        self.forced = False
        self.signum = 0  # the first signal
        self._raise = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, _frame) -> None:
        self.forced = self.forced or (self.requested and signum == signal.SIGINT)
        self.requested = True  # a repeat changes nothing
        self.signum = self.signum or signum
        if self._raise:
            self._raise = False  # once: the clean-up the exception starts must not be interrupted
            raise StopRequested(signum)

    @contextlib.contextmanager
    def interrupting(self):
        """For a start-up that polls nothing (importing torch, reading a cache, planning, joining
        RPC): the first signal raises StopRequested in the main thread, wherever it is (a call
        blocked inside a C extension raises when it returns); a stop requested before raises
        on entry."""
        if self.requested:
            raise StopRequested(self.signum or signal.SIGTERM)
        self._raise = True
        try:
            yield self
        finally:
            self._raise = False

    def set(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`, waking early once a signal came; True if one did."""
        deadline = time.monotonic() + timeout_s
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self.requested

    def restore(self) -> None:
        """The stop is over and only the exit remains (call it last): put the previous handlers
        back, after a stop ignore SIGTERM for the rest of the exit, and tell the launcher
        (`announce_exit`)."""
        if self.requested:
            ignore_repeated_sigterm()
        for sig, handler in self.previous.items():
            if not (self.requested and sig == signal.SIGTERM):
                signal.signal(sig, handler)
        announce_exit()


PARENT_ENV = "MMDIT_PARENT_PID"


def child_env(env: dict | None = None) -> dict:
    """The environment of a child that must not outlive this process (see `die_with_parent`).
    This process's own table (TABLE_ENV) is not passed on: only `start` names the child's."""
    inherited = {k: v for k, v in os.environ.items() if k != TABLE_ENV}
    return {**inherited, **(env or {}), PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Called first thing by every mmdit process: when started by another one (`child_env`),
    ask the kernel to SIGKILL it when that parent dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so a killed launcher never leaves ranks or producers behind. (Set here,
    not in a pre-exec hook, which is unsafe in a parent that runs threads.) The kernel sends it
    when the parent *thread* that started the child exits: start children from a thread that
    lives as long as they should (not from a short-lived pool worker)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the request took effect
        os._exit(1)


def _reconciled(rows: list[dict]) -> list[dict]:
    for row in rows:
        if row.get("returncode") is None and is_local(row) and not process_alive(row["pid"]):
            row["gone"] = True
    return rows


def pidspace() -> str:
    """The space this process's pid means something in: the kernel's boot (a host, until it
    reboots) and the pid namespace (a container). Another host, or container, has another."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def is_local(row: dict) -> bool:
    """Whether the pid of a processes.json row can be checked from here (the same pid space;
    rows written before pid spaces were recorded: the same host name)."""
    return row.get("pidspace", pidspace()) == pidspace() and row.get("host") == socket.gethostname()


def is_rank() -> bool:
    """Is this process one rank of a job started by some launcher (mmdit's, torchrun, SLURM)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the caller binds it soon; another process may take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group that process `pid` leads (it and whatever it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def python_command(module: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *argv]


def start(cmd: list[str], table: ProcessTable, role: str, name_of, env: dict | None = None,
          log_path: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start `cmd` and record it; `name_of(pid)` names it (incarnation names contain the pid).
    It stays in this process's group (a signal to the group reaches it) and dies with this
    process. Output goes to `log_path` when given (appended), else to this process's stdout/stderr.
    """
    out = open(log_path, "ab") if log_path else None
    try:
        proc = subprocess.Popen(cmd, env=child_env({**(env or {}), TABLE_ENV: str(table.dir)}), stdout=out,
                                stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()
    table.add(role, name_of(proc.pid), proc.pid, cmd=cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd)
    return proc


def stop_all(procs: list[subprocess.Popen], table: ProcessTable | None, timeout_s: float,
             sig: int = signal.SIGTERM, forced=lambda: False) -> dict[int, int]:
    """Signal every live process and wait for all; SIGKILL those still stopping after `timeout_s`
    (at once when `forced()`, Ctrl-C again), and those that announced their exit (`announce_exit`)
    but are still running EXIT_GRACE_S later. pid -> exit code; the table records each code, and
    for a process killed here, `"killed"`: when and why."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(sig)
    name, signalled = signal.Signals(sig).name, time.monotonic()
    killed: dict[int, str] = {}
    while running := [p for p in live if p.poll() is None]:
        waited = time.monotonic() - signalled
        if forced():
            late = {p: f"SIGKILL at Ctrl-C again, {waited:.1f} s after {name}" for p in running}
        elif waited > timeout_s:
            exiting = table.exiting() if table is not None else set()
            late = {p: f"SIGKILL {waited:.1f} s after {name}: still stopping after the stop timeout ({timeout_s:g} s)"
                    for p in running if p.pid not in exiting}
            if waited > timeout_s + EXIT_GRACE_S:
                late.update({p: f"SIGKILL {waited:.1f} s after {name}: it had stopped but did not exit within "
                                f"{EXIT_GRACE_S:g} s more" for p in running if p.pid in exiting})
        else:
            late = {}
        for p, why in late.items():
            p.kill()  # nothing is sent if it exited meanwhile, and then its own code stands
            if p.wait() == -signal.SIGKILL:
                killed[p.pid] = why
        time.sleep(0.05)
    codes = {p.pid: p.returncode for p in procs}
    if table is not None:
        for pid, code in codes.items():
            table.set_returncode(pid, code, **({"killed": killed[pid]} if pid in killed else {}))
    return codes


class ServeProcess:
    """`mmdit serve` as a child process, ready once it printed its `serving` line.

    It binds any free port (service.port=0, unless `overrides` set one) and publishes it;
    `info` is the `serving` line (host, port, address_file, control URL, selection counts,
    producer pids) and `client_overrides` point a trainer, consumer or producer at it. `stop()`
    sends SIGTERM, which makes the service stop its producers and leave, and returns (exit code,
    its `stopped` line). With `wait=False` it returns at once: `wait_serving()` then waits (start
    several at once from one thread: a child dies with the thread that started it, see
    `die_with_parent`).
    """

    def __init__(self, overrides: list[str], timeout: float = 120, wait: bool = True):
        # its own process group, holding its producers: kill() reaches them all
        self.proc = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "serve", "service.port=0", *overrides],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True, env=child_env())
        self.info: dict = {}
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 120) -> dict:
        """The `serving` line, once printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 0.5)[0]:
                line = self.proc.stdout.readline()
                if '"serving"' in line:
                    self.info = json.loads(line)
                    return self.info
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmdit serve exited with {self.proc.returncode}")
        self.kill()
        raise TimeoutError(f"mmdit serve did not start within {timeout:.0f} s")

    @property
    def client_overrides(self) -> list[str]:
        """The overrides that make a client join this service (by the address it published)."""
        return [f"service.address_from={self.info['address_file']}"]

    def stop(self, timeout: float = 60) -> tuple[int, dict]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out = ""
        except KeyboardInterrupt:  # Ctrl-C again: no more waiting
            self.kill()
            raise
        stopped = [json.loads(line) for line in out.splitlines() if '"stopped"' in line]
        return self.proc.returncode, stopped[0] if stopped else {}

    def kill(self) -> None:
        signal_group(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
