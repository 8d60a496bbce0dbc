"""`mmdit demo`: the whole local pipeline on this machine, from nothing to a trained checkpoint.

    tiny encoders -> synthetic shards -> mmdit produce (score, filter, bucket, encode, cache)
    -> mmdit serve (coordinator + producers) -> mmdit train (batches over TensorPipe RPC)

Each stage is the real command, run as its own process; stages whose output exists are reused
(produce is incremental: a rerun encodes nothing new). Everything lands in run.dir (default
runs/demo). Extra `key=value` overrides go to every stage, e.g. `launch.nproc=2 parallel.tp=2`.
"""

import json
import subprocess
import sys
from pathlib import Path

from mmdit.launch.config import load_config
from mmdit.launch.processes import ServeProcess
from mmdit.parallel.spawn import free_port


def mmdit(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmdit.launch.cli", *args]


def run_stage(name: str, cmd: list[str]) -> None:
    print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
    result = subprocess.run(cmd)
    if result.returncode:
        raise SystemExit(f"mmdit demo: stage {name!r} failed with exit code {result.returncode}")


def main(argv: list[str]) -> int:
    cfg = load_config(argv)  # validates the overrides once, before any stage runs
    run = Path(cfg.run.dir)
    encoders = Path(cfg.encoders.dir) if cfg.encoders.dir else run / "encoders"
    shards = run / "shards"
    common = [f"run.dir={run}", f"encoders.dir={encoders}", f"cache.dir={cfg.cache.dir}", *argv]
    if not (encoders / "vae").is_dir():
        run_stage("encoders", mmdit("make-tiny-encoders", str(encoders)))
    if not list(shards.glob("*.tar")):
        run_stage("synth", mmdit("synth", str(shards), *[a for a in argv if a.startswith("synth.")]))
    run_stage("produce", mmdit("produce", f"data.shards={shards}/*.tar", *common))
    dp = cfg.launch.nproc // cfg.parallel.tp
    service = [f"service.port={free_port()}", f"service.dp_size={dp}"]
    serve_overrides = [*common, f"run.dir={run / 'service'}", "service.producers=2", *service]
    print(f"== serve: {' '.join(serve_overrides)}", flush=True)
    serve = ServeProcess(serve_overrides)
    print(json.dumps(serve.info), flush=True)
    try:
        run_stage("train", mmdit("train", *common, "train.data_source=service", *service))
    finally:
        print(json.dumps(serve.stop()[1]), flush=True)
    summary = json.loads((run / "summary.json").read_text())
    if summary["steps_run"]:
        print(f"== done: {summary['steps_run']} steps, loss {summary['first_loss']:.4f} -> "
              f"{summary['final_loss']:.4f}; metrics in {run / 'metrics.jsonl'}, checkpoints in {run / 'checkpoints'}")
    else:
        print(f"== done: {run} is already trained to step {cfg.train.steps} (raise train.steps to go on)")
    return 0
