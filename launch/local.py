"""The local launcher (the embedded default): start `launch.nproc` ranks on this machine.

A command that needs several ranks re-runs itself under torchrun (torch.distributed.run) with
the same overrides; inside torchrun (RANK set) it just runs.
"""

import os
import subprocess
import sys


def relaunch_under_torchrun(module: str, argv: list[str], cfg) -> bool:
    """Run `python -m module argv` on launch.nproc local ranks; True if this process delegated."""
    nproc = cfg.launch.nproc
    if nproc <= 1 or "RANK" in os.environ:
        return False
    if nproc % cfg.parallel.tp:
        raise ValueError(f"launch.nproc={nproc} must be a multiple of parallel.tp={cfg.parallel.tp}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // nproc)))}
    result = subprocess.run(cmd, env=env)
    if result.returncode:
        raise SystemExit(result.returncode)
    return True
