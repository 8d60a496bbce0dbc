"""`mmdit serve`: the data service on this machine, as real processes.

This process is the coordinator (RPC rank 0, the store host); it starts `service.producers`
producer processes (`mmdit producer`, same overrides, joined to the port the store got), records
every process in run.dir/processes.json, logs producers to run.dir/logs/, and keeps
run.dir/service.json current. Once it serves, its address is in run.dir/address.json (with
service.port=0 the store takes any free port: clients join with service.address_from=run.dir)
and in its `serving` line on stdout; it removes the file when it stops. It runs until
SIGTERM/SIGINT (or `service.max_runtime_s`), then stops the producers (SIGTERM: they hand their
leases back and leave the group) and leaves last.

One service per run dir: it locks run.dir/service.lock before it writes anything (a second
`mmdit serve` there exits 2 naming the first; see launch/service_lock.py). A signal during
start-up (imports, reading the cache, planning, joining RPC) stops it there: exit 130, nothing
left behind.

Producers that die are not restarted here (their leases go to the others); more producers can
join at any time with `mmdit producer` and the same overrides. With eval.evaluator=true it also
starts the evaluator (`mmdit evaluate eval.evaluator_run`, the trainer's run dir), stopped with
the producers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from mmdit.config.loader import load_config
from mmdit.launch.args import Command, parse
from mmdit.launch.service_lock import ServiceLock, ServiceLockHeld
from mmdit.utils.processes import ProcessTable, SignalStop, StopRequested, python_command, start, stop_all

log = logging.getLogger("mmdit.serve")


COMMAND = Command("serve", __doc__, sections=("service", "data", "cache", "encoders", "eval", "run", "launch", "seed"))


def main(argv: list[str]) -> int:
    cfg = load_config(parse(COMMAND, argv).overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    svc, run_dir = cfg.service, Path(cfg.run.dir)
    stop = SignalStop()
    try:
        with stop.interrupting():
            lock = ServiceLock.acquire(run_dir)  # the addresses once bound (service.port may be 0)
    except ServiceLockHeld as e:
        print(f"mmdit serve: {e}", file=sys.stderr)
        stop.restore()
        return 2
    except StopRequested as e:
        print(f"mmdit serve: {e.signal_name} during start-up: stopped before serving", file=sys.stderr)
        stop.restore()
        return 130
    try:
        return _serve(cfg, argv, run_dir, stop, lock)
    finally:
        stop.restore()
        lock.release()


def _serve(cfg, argv: list[str], run_dir: Path, stop: SignalStop, lock: ServiceLock) -> int:
    from mmdit.dataservice.address import ADDRESS_JSON

    svc = cfg.service
    (run_dir / ADDRESS_JSON).unlink(missing_ok=True)  # a dead service's (this one holds the lock): nobody may follow it
    table = ProcessTable(run_dir)
    service, procs, rpc, code = None, [], None, 1  # 1: failed, unless it ends otherwise
    try:
        with stop.interrupting():  # start-up: a signal stops whichever phase runs
            from mmdit.dataservice import rpc
            from mmdit.dataservice.coordinator import CoordinatorService
            from mmdit.dataservice.plan import PlanError

            (run_dir / "logs").mkdir(parents=True, exist_ok=True)
            table.add("coordinator", rpc.COORDINATOR, os.getpid())
            try:
                service = CoordinatorService(cfg, run_dir)
            except (PlanError, rpc.RpcError) as e:
                print(f"mmdit serve: {e}", file=sys.stderr)
                code = 2
                return code
            where = service.address
            lock.record(rpc=f"{where.host}:{where.port}", control=service.control.url)
            # the port it got, not service.port (maybe 0), nor another service's address_from
            producer_argv = ["producer", *argv, f"service.host={where.host}", f"service.port={where.port}",
                             "service.address_from="]
            for n in range(svc.producers):
                procs.append(start(
                    python_command("mmdit.launch.cli", producer_argv), table, "producer",
                    lambda pid, n=n: rpc.incarnation_name("producer", n=n, pid=pid),
                    env={"MMDIT_INCARNATION": str(n)}, log_path=run_dir / "logs" / f"producer-{n}.log"))
            if cfg.eval.evaluator:  # it follows the trainer's run dir (eval.evaluator_run), not the service's
                procs.append(start(
                    python_command("mmdit.launch.cli", ["evaluate", cfg.eval.evaluator_run or str(run_dir),
                                                        f"eval.evaluator_tp={cfg.eval.evaluator_tp}"]),
                    table, "evaluator", lambda pid: f"evaluator_{pid}", log_path=run_dir / "logs" / "evaluator.log"))
        print(f"dashboard: {service.dashboard_url}", file=sys.stderr, flush=True)
        print(json.dumps({"event": "serving", "host": where.host, "port": where.port,
                          "address_file": str(service.address_path), "control": service.control.url,
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
        code = 0
    except StopRequested as e:
        print(f"mmdit serve: {e.signal_name} during start-up: stopped before serving", file=sys.stderr)
        code = 130
    finally:
        if stop.is_set() and procs:
            log.warning("stopping %d producers (Ctrl-C again kills them now)", len(procs))
        codes = stop_all(procs, table, svc.shutdown_timeout_s, forced=lambda: stop.forced)
        if service is not None:
            status = service.write_status()
            service.stop()
            print(json.dumps({"event": "stopped", "producer_exit_codes": list(codes.values()),
                              "counters": status["counters"]}), flush=True)
        else:
            _abandon_start_up(run_dir, rpc)
        table.set_returncode(os.getpid(), code)
    return code


def _abandon_start_up(run_dir: Path, rpc) -> None:
    """Undo what a start-up cut short may have done: joined RPC (`rpc`: the module, None if its
    import never finished), written the control files or published its address (this process
    holds the run dir's lock: any there are its own, or a dead service's)."""
    if rpc is not None:
        rpc.leave(graceful=False)
    from mmdit.dataservice.address import ADDRESS_JSON
    from mmdit.dataservice.control import CONTROL_JSON, CONTROL_TOKEN

    for name in (ADDRESS_JSON, CONTROL_JSON, CONTROL_TOKEN):
        (run_dir / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
