"""Watching a run: Prometheus /metrics (scraped by a real Prometheus server), the dashboard in
headless Chromium, TensorBoard scalars, and `mmdit status` on a live and on a finished run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mmdit.cache.store import LatentCache
from mmdit.config.service import ServiceConfig
from mmdit.dataservice.coordinator import Coordinator
from mmdit.dataservice.plan import DataVersion, SampleRef, Selection
from mmdit.dataservice.telemetry import PrometheusCollector
from mmdit.utils.processes import ServeProcess, free_port

# ----------------------------------------------------------------------------- in process

GRPO_FIGURES = {"reward_mean": 0.25, "reward_std": 0.125, "advantage_abs_mean": 0.8, "clip_fraction": 0.0,
                "approx_kl": 1e-6, "kl": 2e-4, "rollout_s": 3.0, "reward_s": 1.0, "images": 8.0,
                "dropped_samples": 1.0, "skipped_groups": 0.0, "reward_retries": 0.0, "reward_wait_s": 0.5,
                "update_s": 1.5}
"""What a GRPO step reports (consumer/grpo_objective.py `loss`, and the timings still to come)."""


def test_prometheus_series_carry_labels_and_leave_unknown_mfu_out():
    refs = [SampleRef(f"k{i}", (256, 256), "t2i") for i in range(8)]
    c = Coordinator(Selection(refs), ServiceConfig(plan_ahead=4), 0, 2, 1, [DataVersion(0, 0, 0)])
    c.lease("pa", 1, 2, [], False, {"batches_served": 5, "cache_hits": 9, "cache_misses": 1, "encoded": 1}).wait()
    c.register_consumer("t0", 9, 0, 2, 1, None, None)
    c.ack("t0", 0, c.gen, [], {"step": 7, "loss": 0.5, "samples_per_second": 3.0, "image_tokens_per_second": 768.0,
                               "tflops_per_device": 0.01, "mfu": None, "data_wait_fraction": 0.02,
                               "config_version": 0, "wall_total_s": 10.0, "step_total_s": 9.0,
                               "data_wait_total_s": 0.5, "checkpoint_stall_total_s": 0.25, "eval_stall_total_s": 0.0,
                               "objective": GRPO_FIGURES})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(c, c.telemetry))
    text = generate_latest(registry).decode()
    for line in ('mmdit_step{dp_rank="0"} 7.0', 'mmdit_loss{dp_rank="0"} 0.5', "mmdit_producers_alive 1.0",
                 'mmdit_batches_served_total{producer="pa"} 5.0', 'mmdit_cache_misses_total{producer="pa"} 1.0',
                 'mmdit_encoded_samples_total{producer="pa"} 1.0', 'mmdit_leases_outstanding{producer="pa"} 1.0',
                 "mmdit_config_version 0.0", 'mmdit_image_tokens_per_second{dp_rank="0"} 768.0',
                 'mmdit_step_time_fraction{dp_rank="0"} 0.9',  # where the wall time goes
                 'mmdit_trainer_wall_seconds_total{dp_rank="0",part="checkpoint_stall"} 0.25'):
        assert line in text, line
    assert "mmdit_mfu{" not in text  # unknown on a CPU: absent, never 0
    for name, value in GRPO_FIGURES.items():  # every GRPO figure, none cut by the per-report bound
        assert f'mmdit_objective{{dp_rank="0",figure="{name}"}} {float(value)!r}' in text, name
    assert c.telemetry.series()["objective"]["update_s"] == [1.5]


# ----------------------------------------------------------------------------- a live run

DIM = 64


def records(n=24):
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"key": f"k{i:03d}", "fingerprint": "fp_obs", "bucket": (128, 128), "task": "t2i", "caption": f"c{i}",
             "source": "s", "latents": torch.randn(16, 16, 16, generator=g),
             "prompt_embeds": torch.randn(4, DIM, generator=g)} for i in range(n)]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def status(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "status", str(run_dir)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """`mmdit serve` + `mmdit train` over it, training until the module's tests are done."""
    tmp = tmp_path_factory.mktemp("live")
    LatentCache(tmp / "cache").write(records())
    common = [f"cache.dir={tmp / 'cache'}", "service.producers=2", "train.micro_batch_size=2",
              "data.eval_fraction=0.25", "eval.evaluator=true"]  # evaluations on the evaluator serve starts
    serve = ServeProcess([*common, f"run.dir={tmp / 'service'}", f"eval.evaluator_run={tmp / 'train'}"])
    trainer = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={tmp / 'train'}",
                                *common, *serve.client_overrides, "train.data_source=service", "train.steps=100000",
                                "checkpoint.every=20", "eval.every=5", "eval.max_samples=4", "eval.sigmas=2"],
                               stdout=subprocess.DEVNULL, stderr=(tmp / "trainer.err").open("w"), text=True)

    def three_steps():
        assert trainer.poll() is None, f"the trainer exited {trainer.returncode}: {(tmp / 'trainer.err').read_text()[-3000:]}"
        metrics = tmp / "train" / "metrics.jsonl"
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    wait_until(three_steps, 300, "three training steps")
    yield {"dir": tmp, "url": serve.info["control"], "dashboard": serve.info["dashboard"], "trainer": trainer}
    trainer.send_signal(signal.SIGTERM)  # checkpoints, then exits 0
    trainer.communicate(timeout=300)
    serve.stop()
    serve.kill()


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: `make test` installs it (Debian package)")
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_real_prometheus_scrapes_the_series(live_run, tmp_path):
    text = get(live_run["url"] + "/metrics")
    check = subprocess.run([_require("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    target = urllib.parse.urlparse(live_run["url"]).netloc
    (tmp_path / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mmdit\n    static_configs:\n"
        f"      - targets: ['{target}']\n")
    port = free_port()
    prometheus = subprocess.Popen([_require("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(expr):
            try:
                body = json.loads(get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"))
            except OSError:
                return None
            return body["data"]["result"] or None

        throughput = wait_until(lambda: query("mmdit_samples_per_second"), 180, "a scraped mmdit_samples_per_second")
        alive = wait_until(lambda: query("mmdit_producers_alive"), 60, "mmdit_producers_alive")
        locates = wait_until(lambda: query('mmdit_coordinator_calls_total{kind="locate"}'), 60,
                             "the coordinator's own calls")
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=60)
    assert throughput[0]["metric"]["dp_rank"] == "0" and float(throughput[0]["value"][1]) > 0
    assert float(alive[0]["value"][1]) == 2
    assert float(locates[0]["value"][1]) > 0  # the coordinator's own health is scraped too


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000", "--window-size=1400,1100"]


def grpo_view(upstream: str):
    """A local HTTP proxy of the live dashboard whose /api/series carries the objective figures a
    GRPO trainer would report at the live run's steps (through a real Telemetry), so one browser
    start checks the live charts and GRPO's: the live run trains flow matching, which has none."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mmdit.dataservice.telemetry import Telemetry

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):
            body = get(upstream + self.path)
            if self.path.startswith("/api/series"):
                series = json.loads(body)
                times = series["trainer"]["time"]
                now = [0.0]
                fake = Telemetry(clock=lambda: now[0])
                for step, time_ in enumerate(times):
                    now[0] = time_
                    figures = {**GRPO_FIGURES, "reward_mean": 0.1 * step, "images": 0.0 if step % 2 else 8.0}
                    fake.trainer_report(0, {"step": step, "objective": figures})
                series["objective"] = fake.series()["objective"]
                body = json.dumps(series).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dashboard_draws_live_charts_in_a_browser(live_run, tmp_path):
    """The live charts, and GRPO's reward and time charts once its figures exist (through a proxy
    that adds them: grpo_view); the GRPO panels are hidden on a run without them."""
    chromium = _require("chromium")
    url = live_run["dashboard"]
    assert 'id="panel-grpo-reward" hidden' in get(url).decode()  # shown by the page only once GRPO reports
    metrics = live_run["dir"] / "train" / "metrics.jsonl"
    wait_until(lambda: "eval_loss" in metrics.read_text(), 300, "a held-out loss from the evaluator")
    upstream = urllib.parse.urlparse(url)
    proxy = grpo_view(f"{upstream.scheme}://{upstream.netloc}")
    try:
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'a'}", "--dump-dom",
                              f"http://127.0.0.1:{proxy.server_address[1]}{upstream.path}"],
                             capture_output=True, text=True, timeout=180).stdout
    finally:
        proxy.shutdown()
    import re

    points = dict(re.findall(r'id="chart-([a-z-]+)"[^>]*data-points="(\d+)"', dom))
    for chart in ("loss", "throughput", "flops", "wait", "producers", "alive", "walltime", "evals", "coord-calls",
                  "coord-load", "grpo-reward", "grpo-time"):
        assert int(points.get(chart, 0)) > 0, (chart, points)
    assert not re.search(r'id="panel-grpo-(reward|time)"[^>]*hidden', dom)  # shown: GRPO figures exist
    assert "the coordinator does not answer" not in dom and "step " in dom and "in steps " in dom
    shot = tmp_path / "dashboard.png"  # the live page itself (no GRPO figures: its panels stay hidden)
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'b'}", f"--screenshot={shot}", url],
                   capture_output=True, timeout=180)
    assert shot.stat().st_size > 20_000  # a page with charts, not a blank one
    if os.environ.get("MMDIT_DASHBOARD_SHOT"):
        shutil.copy(shot, os.environ["MMDIT_DASHBOARD_SHOT"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_status_of_a_live_then_a_finished_run_and_tensorboard(live_run):
    run = live_run["dir"] / "train"
    live = status(live_run["dir"])
    assert live.returncode == 0 and "running" in live.stdout.splitlines()[0]
    assert "producers alive" in status(live_run["dir"] / "service").stdout
    train_status = status(run)
    assert "running" in train_status.stdout.splitlines()[0] and "step " in train_status.stdout
    live_run["trainer"].send_signal(signal.SIGTERM)
    _, err = live_run["trainer"].communicate(timeout=300)
    assert live_run["trainer"].returncode == 0, err[-2000:]
    finished = status(run)
    assert "not running" in finished.stdout.splitlines()[0]
    assert "last checkpoint: step_" in finished.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {"train/loss", "train/samples_per_second", "train/data_wait_fraction"} <= set(board.Tags()["scalars"])
    steps = [e.step for e in board.Scalars("train/loss")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in records if not r.get("eval")]
