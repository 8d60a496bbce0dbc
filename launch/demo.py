"""`mmdit demo`: the whole local pipeline on this machine, from nothing to a trained checkpoint.

    tiny encoders -> synthetic shards -> mmdit produce (score, filter, bucket, encode, cache)
    -> mmdit serve (coordinator + producers) -> mmdit train (batches over TensorPipe RPC)

Each stage is the real command, run as its own process (and process group), recorded in
run.dir/processes.json; stages whose output exists are reused (produce is incremental: a rerun
encodes nothing new). Everything lands in run.dir (default runs/demo). Extra `key=value`
overrides go to every stage, e.g. `launch.nproc=2 parallel.tp=2`. Ctrl-C or SIGTERM stops the
running stage and the data service, and with them every process they started.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from mmdit.launch.config import load_config
from mmdit.launch.processes import ProcessTable, ServeProcess, child_env, signal_group
from mmdit.parallel.spawn import free_port


def mmdit(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmdit.launch.cli", *args]


class Stages:
    """Runs stages one at a time, each in its own process group, and stops the current one (and
    everything it started) on Ctrl-C or SIGTERM."""

    def __init__(self, table: ProcessTable, shutdown_timeout_s: float):
        self.table, self.timeout = table, shutdown_timeout_s

    def run(self, name: str, cmd: list[str]) -> None:
        print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
        proc = subprocess.Popen(cmd, start_new_session=True, env=child_env())
        self.table.add(name, f"demo_{name}", proc.pid)
        try:
            code = proc.wait()
        except BaseException:  # KeyboardInterrupt, or SIGTERM turned into one
            signal_group(proc.pid, signal.SIGTERM)  # a trainer checkpoints, then exits
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                pass
            signal_group(proc.pid, signal.SIGKILL)
            code = proc.wait()
            raise
        finally:
            self.table.set_returncode(proc.pid, proc.returncode)
        if code:
            raise SystemExit(f"mmdit demo: stage {name!r} failed with exit code {code}")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    cfg = load_config(argv)  # validates the overrides once, before any stage runs
    signal.signal(signal.SIGTERM, _interrupt)
    run = Path(cfg.run.dir)
    table = ProcessTable(run)
    table.add("demo", "demo", os.getpid())
    code = 1
    try:
        _run(cfg, argv, run, table)
        code = 0
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        table.set_returncode(os.getpid(), code)
    return 0


def _run(cfg, argv: list[str], run: Path, table: ProcessTable) -> None:
    encoders = Path(cfg.encoders.dir) if cfg.encoders.dir else run / "encoders"
    shards = run / "shards"
    stages = Stages(table, cfg.service.shutdown_timeout_s)
    common = [f"run.dir={run}", f"encoders.dir={encoders}", f"cache.dir={cfg.cache.dir}", *argv]
    if not (encoders / "vae").is_dir():
        stages.run("encoders", mmdit("make-tiny-encoders", str(encoders)))
    if not list(shards.glob("*.tar")):
        stages.run("synth", mmdit("synth", str(shards), *[a for a in argv if a.startswith("synth.")]))
    stages.run("produce", mmdit("produce", f"data.shards={shards}/*.tar", *common))
    dp = cfg.launch.nproc // cfg.parallel.tp
    service = [f"service.port={free_port()}", f"service.dp_size={dp}"]
    serve_overrides = [*common, f"run.dir={run / 'service'}", "service.producers=2", *service]
    print(f"== serve: {' '.join(serve_overrides)}", flush=True)
    serve = ServeProcess(serve_overrides)
    table.add("serve", "demo_serve", serve.proc.pid)
    print(f"== dashboard: {serve.info['dashboard']}  (live while the demo trains; `mmdit status {run}`, "
          f"`mmdit ctl get {run}`)", flush=True)
    try:
        stages.run("train", mmdit("train", *common, "train.data_source=service", *service))
    finally:
        print(json.dumps(serve.stop(timeout=2 * cfg.service.shutdown_timeout_s)[1]), flush=True)
        table.set_returncode(serve.proc.pid, serve.proc.returncode)
    summary = json.loads((run / "summary.json").read_text())
    if summary["steps_run"]:
        print(f"== done: {summary['steps_run']} steps, loss {summary['first_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}; metrics in {run / 'metrics.jsonl'}, checkpoints in {run / 'checkpoints'}")
    else:
        print(f"== done: {run} is already trained to step {cfg.train.steps} (raise train.steps to go on)")
