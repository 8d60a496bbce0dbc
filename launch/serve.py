"""`mmdit serve`: the data service on this machine, as real processes.

This process is the coordinator (RPC rank 0, the store host); it starts `service.producers`
producer processes (`mmdit producer`, same overrides), records every process
in run.dir/processes.json, logs producers to run.dir/logs/, and keeps run.dir/service.json
current. It runs until SIGTERM/SIGINT (or `service.max_runtime_s`), then stops the producers
(SIGTERM: they hand their leases back and leave the group) and leaves last.

Producers that die are not restarted here (their leases go to the others); more producers can
join at any time with `mmdit producer` and the same overrides.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from mmdit.launch.config import load_config
from mmdit.launch.processes import ProcessTable, SignalStop, python_command, start, stop_all

log = logging.getLogger("mmdit.serve")


def main(argv: list[str]) -> int:
    cfg = load_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from mmdit.dataservice import rpc
    from mmdit.dataservice.coordinator import CoordinatorService
    from mmdit.dataservice.plan import PlanError

    svc = cfg.service
    run_dir = Path(cfg.run.dir)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    table = ProcessTable(run_dir)
    stop = SignalStop()
    table.add("coordinator", rpc.COORDINATOR, os.getpid())
    try:
        service = CoordinatorService(cfg, run_dir)
    except (PlanError, rpc.RpcError) as e:
        print(f"mmdit serve: {e}", file=sys.stderr)
        table.set_returncode(os.getpid(), 2)
        return 2
    procs = []
    try:
        for n in range(svc.producers):
            procs.append(start(
                python_command("mmdit.launch.cli", ["producer", *argv]), table, "producer",
                lambda pid, n=n: rpc.incarnation_name("producer", n=n, pid=pid),
                env={"MMDIT_INCARNATION": str(n)}, log_path=run_dir / "logs" / f"producer-{n}.log"))
        print(f"dashboard: {service.dashboard_url}", file=sys.stderr, flush=True)
        print(json.dumps({"event": "serving", "host": svc.host, "port": svc.port, "control": service.control.url,
                          "dashboard": service.dashboard_url,
                          "selected": service.selection_counts,
                          "producers": [p.pid for p in procs]}), flush=True)
        deadline = time.monotonic() + svc.max_runtime_s if svc.max_runtime_s else None
        exited: set[int] = set()
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() > deadline:
                log.info("service.max_runtime_s=%.0f reached", svc.max_runtime_s)
                break
            for p in procs:
                if p.poll() is not None and p.pid not in exited:
                    exited.add(p.pid)
                    table.set_returncode(p.pid, p.returncode)
                    log.warning("producer pid %d exited with %s", p.pid, p.returncode)
    finally:
        if stop.is_set():
            log.warning("stopping %d producers (Ctrl-C again kills them now)", len(procs))
        codes = stop_all(procs, table, svc.shutdown_timeout_s, forced=lambda: stop.forced)
        status = service.write_status()
        service.stop()
        table.set_returncode(os.getpid(), 0)
        print(json.dumps({"event": "stopped", "producer_exit_codes": list(codes.values()),
                          "counters": status["counters"]}), flush=True)
        stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
