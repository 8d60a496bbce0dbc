"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd on this host.

Debian's `slurm-wlm` and `munge` (make test installs them). Everything lives in one temporary
directory (config, state, spool, logs, the munge key and socket), so the tests need no system
configuration and leave none; `stop()` ends the daemons. SLURM_CONF points the client commands
(sbatch, squeue, scontrol) at it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class SlurmCluster:
    # SLURM holds a requeued job for the credential lifetime + 1 s (120 s by default) so that the
    # new launch credential postdates the old one's revocation; a shorter lifetime keeps the
    # requeue test quick without skipping that wait (a job started sooner can be silently not
    # launched: slurmd takes its credential for the revoked one and leaves the job RUNNING empty).
    CRED_EXPIRE_S = 20

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @staticmethod
    def available() -> bool:
        return all(shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"))

    def _node(self) -> str:
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()[0]
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        memory = int(fields["RealMemory"]) - 1024
        return f"NodeName={self.host} CPUs={fields['CPUs']} RealMemory={memory} State=UNKNOWN"

    def start(self, timeout: float = 180) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)  # the socket must be reachable
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = r / "munge" / "munge.socket"
        self.conf.write_text("\n".join([
            "ClusterName=mmdit-test", f"SlurmctldHost={self.host}", "AuthType=auth/munge",
            "CredType=cred/munge", f"AuthInfo=socket={socket_path},cred_expire={self.CRED_EXPIRE_S}", "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # start a requeued job soon after its hold
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldPort=6917", "SlurmdPort=6918", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "KillWait=30", "InactiveLimit=0", "MinJobAge=600",
            "MailProg=/bin/true",
            self._node(),
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]) + "\n")
        self.procs.append(subprocess.Popen(["munged", "-F", "--key-file", str(key), "--socket", str(socket_path),
                                            "--pid-file", str(r / "munge" / "munged.pid"), "--log-file",
                                            str(r / "log" / "munged.log"), "--seed-file", str(r / "munge" / "seed"),
                                            "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(lambda: socket_path.exists(), timeout, "munged")
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self._wait(self._idle, timeout, "the node to come up idle")

    def _idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
        return out.strip() in ("idle", "mix", "alloc")

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.3)

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s")
            time.sleep(1)
        return state

    def report(self, job_id: str, run: Path) -> str:
        """What a failed test prints: the job as SLURM sees it, the daemons' and the job's log tails."""
        parts = [self.run("scontrol", "show", "job", job_id).stdout]
        logs = [self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log", *sorted(run.glob("logs/*"))]
        for log in logs:
            if log.is_file():
                parts.append(f"--- {log.name} (tail)\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
