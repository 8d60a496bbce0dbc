"""The local launcher (the embedded default): the ranks of one job, started on this machine.

mmdit starts local ranks itself rather than through `torchrun --standalone`, whose rendezvous
store listens on every interface on a port of its own choosing. Here:
- rank 0 hosts the job's store on 127.0.0.1:`launch.master_port` (utils/store.py), and gloo
  sockets use the loopback interface: nothing of the job listens beyond this machine (a rank that
  joins the data service listens where the service's address model says, utils/netaddr.py:
  loopback for a local service);
- every rank is recorded in run.dir/processes.json with its exit code;
- ranks stay in the launcher's process group (a Ctrl-C in the terminal reaches them all, and
  whoever started the launcher in a group of its own can stop everything with one signal) and
  die with the launcher, even when it is SIGKILLed;
- SIGINT/SIGTERM to the launcher alone is passed on as SIGTERM to every rank (a trainer then
  checkpoints and exits); ranks still running after `launch.stop_timeout_s` are killed, and a
  second SIGINT (Ctrl-C again) kills them at once. When one rank fails, the others get SIGTERM
  too, and SIGKILL after `service.shutdown_timeout_s` (they cannot checkpoint without it).

Under torchrun, SLURM or any launcher that sets RANK/WORLD_SIZE, a command just runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

from mmdit.utils.processes import ProcessTable, SignalStop, child_env, free_port, is_rank, python_command, stop_all

log = logging.getLogger("mmdit.launch")


def launch_local(command: str, argv: list[str], nproc: int, run_dir: str, role: str, master_port: int,
                 stop_timeout_s: float, failure_timeout_s: float) -> int:
    """Run `mmdit command argv` as `nproc` ranks on this machine; the first failure's exit code."""
    table = ProcessTable(run_dir)
    master_port = master_port or free_port()
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs: list[subprocess.Popen] = []
    stop = SignalStop()
    try:
        for rank in range(nproc):
            env = {**child_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
                   "GLOO_SOCKET_IFNAME": "lo",
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            proc = subprocess.Popen(python_command("mmdit.launch.cli", [command, *argv]), env=env)
            procs.append(proc)
            table.add(role, f"{role}_rank{rank}", proc.pid, rank=rank)
        worst = _wait(procs, table, stop, stop_timeout_s, failure_timeout_s)
    finally:
        stop_all(procs, table, failure_timeout_s)  # only ranks left by an error in the launcher itself
        stop.restore()
    if stop.is_set() and (stop.forced or worst in (0, -signal.SIGTERM)):
        return 130  # stopped by the operator
    return worst


def _wait(procs: list[subprocess.Popen], table: ProcessTable, stop: SignalStop, stop_timeout_s: float,
          failure_timeout_s: float) -> int:
    """Until every rank exited, the first failure (others are stopped then), or a signal."""
    recorded: set[int] = set()
    while len(recorded) < len(procs):
        if stop.is_set():
            log.warning("stopping %d ranks: they checkpoint first (Ctrl-C again kills them now)",
                        len(procs) - len(recorded))
            stop_all(procs, table, stop_timeout_s, forced=lambda: stop.forced)
            break
        for proc in procs:
            if proc.pid not in recorded and proc.poll() is not None:
                recorded.add(proc.pid)
                table.set_returncode(proc.pid, proc.returncode)
                if proc.returncode:
                    log.error("rank pid %d exited with %d; stopping the others", proc.pid, proc.returncode)
                    stop_all(procs, table, failure_timeout_s)
                    return proc.returncode
        time.sleep(0.1)
    codes = [p.returncode for p in procs if p.returncode is not None]
    return next((c for c in codes if c), 0)


def exit_code_of(code: int) -> int:
    """A launcher's own exit code for a child's (a signal -N becomes 128 + N, as shells do)."""
    return 128 - code if code < 0 else code


def main_or_launch(command: str, argv: list[str], cfg, role: str, nproc: int | None = None) -> int | None:
    """In a launcher with more than one process (launch.nproc): start the ranks, return their
    exit code. In a rank, or with one process: None (the caller runs the job itself)."""
    nproc = cfg.launch.nproc if nproc is None else nproc
    if nproc <= 1 or is_rank():
        return None
    code = launch_local(command, argv, nproc, cfg.run.dir, role, cfg.launch.master_port,
                        cfg.launch.stop_timeout_s, cfg.service.shutdown_timeout_s)
    return exit_code_of(code)
