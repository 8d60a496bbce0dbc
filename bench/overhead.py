"""What watching a run costs: trainer step time with metrics, dashboard and TensorBoard on vs off.

One data service, one cache, the tiny model; `mmdit train` runs of `--steps` steps alternate
between *off* (`train.tensorboard=false train.telemetry=false`, nobody polling) and *on*
(TensorBoard scalars, figures reported to the coordinator with every ack, a Prometheus-style
scraper reading /metrics every second and a dashboard reading /api/series and /api/run every two
seconds). The figure is the ratio of median step times, on / off, over `--rounds` rounds
(ABAB, so drift in the machine's load hits both). Target: overhead below 1%.

    python bench/overhead.py [--steps 80 --rounds 3]   ->  bench/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from mmdit.cache import LatentCache
from mmdit.utils.processes import ServeProcess, free_port

RESULTS = Path(__file__).parent / "results"


def write_cache(path: Path, n: int = 64) -> None:
    g = torch.Generator().manual_seed(0)
    LatentCache(path).write([
        {"key": f"k{i:04d}", "fingerprint": "fp_bench", "bucket": (256, 256), "task": "t2i", "caption": "c",
         "source": "s", "latents": torch.randn(16, 32, 32, generator=g), "prompt_embeds": torch.randn(24, 64, generator=g)}
        for i in range(n)])


def poll(url: str, period_s: float, stop: threading.Event, counter: list) -> None:
    while not stop.wait(period_s):
        try:
            urllib.request.urlopen(url, timeout=10).read()
            counter.append(1)
        except OSError:
            pass


def train(run: Path, common: list[str], steps: int, on: bool) -> list[float]:
    switches = [] if on else ["train.tensorboard=false", "train.telemetry=false"]
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run}", *common,
                           "train.data_source=service", f"train.steps={steps}", "checkpoint.resume=false", *switches],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    times = [json.loads(line)["step_time_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return times[5:]  # warm-up steps excluded


def direct_cost_s(steps: int = 2000) -> float:
    """Seconds per step the observability code itself takes in a trainer: a metrics.jsonl line
    plus TensorBoard scalars, and the figures handed to the data-service client (the side-by-side
    runs above bound the rest: the acks carry them, the coordinator serves the pollers)."""
    from mmdit.consumer.metrics import MetricsWriter, StepMetrics

    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for board in (False, True):
            writer = MetricsWriter(Path(tmp) / str(board), enabled=True, log_every=10**9, tensorboard=board)
            (Path(tmp) / str(board)).mkdir(exist_ok=True)
            started = time.perf_counter()
            for step in range(1, steps + 1):
                m = StepMetrics(step, 0.5, 1e-4, 0.3, 10.0, 2560.0, 0.01, None, 0.01, 0, 0.05, 4)
                writer.write(m)
                m.telemetry()
            timings[board] = (time.perf_counter() - started) / steps
            writer.close()
    return timings[True]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cache(tmp / "cache")
        common = [f"cache.dir={tmp / 'cache'}", f"service.port={free_port()}", "service.producers=2",
                  "train.micro_batch_size=2", "service.plan_ahead=256"]
        serve = ServeProcess([*common, f"run.dir={tmp / 'service'}"])
        medians = {"off": [], "on": []}
        polls: list = []
        try:
            for r in range(args.rounds):
                for mode in ("off", "on"):
                    stop = threading.Event()
                    pollers = []
                    if mode == "on":
                        url = serve.info["control"]
                        pollers = [threading.Thread(target=poll, args=(url + path, period, stop, polls), daemon=True)
                                   for path, period in (("/metrics", 1.0), ("/api/series", 2.0), ("/api/run", 2.0))]
                    for t in pollers:
                        t.start()
                    try:
                        times = train(tmp / f"{mode}{r}", common, args.steps, mode == "on")
                    finally:
                        stop.set()
                    medians[mode].append(statistics.median(times))
                    print(f"round {r} {mode}: median step {medians[mode][-1] * 1e3:.2f} ms", flush=True)
        finally:
            serve.stop()
    ratio = statistics.median(on / off for on, off in zip(medians["on"], medians["off"]))
    direct = direct_cost_s()
    result = {"median_step_s_off": medians["off"], "median_step_s_on": medians["on"], "ratio_on_off": ratio,
              "overhead": ratio - 1, "direct_cost_per_step_s": direct,
              "direct_overhead": direct / statistics.median(medians["off"]), "steps_per_run": args.steps, "rounds": args.rounds, "dashboard_polls": len(polls),
              "device": "cpu", "target": "overhead < 0.01",
              "passed": ratio - 1 < 0.01 and direct / statistics.median(medians["off"]) < 0.01,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
