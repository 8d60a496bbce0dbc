"""Live figures of a job, gathered by the coordinator: trainers report with their acks, producers
with their lease heartbeats (no extra connection per step).

`Telemetry` keeps the latest report of every DP rank and producer, and a bounded time series for
the dashboard; `PrometheusCollector` turns them, with the coordinator's own state, into the
`mmdit_*` series of `/metrics` (prometheus_client's text format).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TRAINER_FIELDS = ("step", "loss", "samples_per_second", "image_tokens_per_second", "tflops_per_device", "mfu",
                  "data_wait_fraction", "config_version")
"""What a trainer's DP rank reports after each step (mfu is None where the peak is unknown)."""
PRODUCER_FIELDS = ("batches_served", "cache_hits", "cache_misses", "encoded")
"""Counters a producer reports with each heartbeat (totals since it started)."""


class Telemetry:
    def __init__(self, history_points: int = 4096, clock=time.time):
        self.clock = clock
        self.lock = threading.Lock()
        self.trainers: dict[int, dict] = {}  # dp_rank -> latest report (+ "time")
        self.producers: dict[str, dict] = {}  # name -> latest counters (+ "time")
        self.points: deque = deque(maxlen=history_points)  # dashboard series, one per DP rank 0 report
        self.producer_points: deque = deque(maxlen=history_points)  # (time, alive, batches/s)
        self.samples: list[str] = []  # directories of sample images trainers wrote, newest last
        self._last_served: tuple[float, float] | None = None

    def trainer_report(self, dp_rank: int, report: dict) -> None:
        if not isinstance(report, dict):
            return
        now = self.clock()
        clean = {k: _number(report.get(k)) for k in TRAINER_FIELDS}
        with self.lock:
            self.trainers[dp_rank] = {**clean, "time": now}
            if dp_rank == 0 and clean["step"] is not None:
                if not self.points or clean["step"] > self.points[-1]["step"]:
                    self.points.append({**clean, "time": now})
            if isinstance(report.get("samples_dir"), str) and report["samples_dir"] not in self.samples:
                self.samples = (self.samples + [report["samples_dir"]])[-16:]

    def producer_report(self, name: str, counters: dict) -> None:
        if not isinstance(counters, dict):
            return
        with self.lock:
            self.producers[name] = {**{k: _number(counters.get(k)) or 0 for k in PRODUCER_FIELDS},
                                    "time": self.clock()}

    def tick(self, producers_alive: int) -> None:
        """Called about once a second: one point of the producer series."""
        now = self.clock()
        with self.lock:
            served = sum(p["batches_served"] for p in self.producers.values())
            rate = None
            if self._last_served is not None and now > self._last_served[0]:
                rate = max(0.0, served - self._last_served[1]) / (now - self._last_served[0])
            self._last_served = (now, served)
            self.producer_points.append({"time": now, "producers_alive": producers_alive,
                                         "batches_per_second": rate})

    def series(self) -> dict:
        """The dashboard's data: trainer and producer series (columns), latest reports."""
        with self.lock:
            points, prod = list(self.points), list(self.producer_points)
            return {"trainer": {k: [p.get(k) for p in points] for k in ("time", *TRAINER_FIELDS)},
                    "producers": {k: [p[k] for p in prod] for k in ("time", "producers_alive", "batches_per_second")},
                    "latest": {str(r): dict(v) for r, v in self.trainers.items()},
                    "producer_counters": {n: dict(v) for n, v in self.producers.items()},
                    "samples": list(self.samples)}


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) or isinstance(v, float) else None


class PrometheusCollector:
    """The `mmdit_*` series, read at scrape time from the coordinator and its telemetry."""

    def __init__(self, coordinator, telemetry: Telemetry):
        self.coordinator, self.telemetry = coordinator, telemetry

    def collect(self):
        status = self.coordinator.status()
        with self.telemetry.lock:
            trainers = {r: dict(v) for r, v in self.telemetry.trainers.items()}
            producers = {n: dict(v) for n, v in self.telemetry.producers.items()}
        gauges = {
            "step": "Optimizer steps completed", "loss": "Training loss of the last step (mean over DP)",
            "samples_per_second": "Global samples per second", "image_tokens_per_second": "Image tokens per second",
            "tflops_per_device": "Model TFLOP/s per device", "mfu": "Model FLOPs utilization (absent: unknown peak)",
            "data_wait_fraction": "Fraction of the step spent waiting for data",
        }
        for field, doc in gauges.items():
            g = GaugeMetricFamily(f"mmdit_{field}", doc, labels=["dp_rank"])
            for rank, report in sorted(trainers.items()):
                if report.get(field) is not None:
                    g.add_metric([str(rank)], report[field])
            yield g
        yield GaugeMetricFamily("mmdit_config_version", "Data-config version in force", value=status["config_version"])
        alive = sum(p["alive"] for p in status["producers"].values())
        yield GaugeMetricFamily("mmdit_producers_alive", "Producers alive", value=alive)
        leases = GaugeMetricFamily("mmdit_leases_outstanding", "Batches a producer holds", labels=["producer"])
        for name, p in sorted(status["producers"].items()):
            if p["alive"]:
                leases.add_metric([name], p["held"])
        yield leases
        for field, metric, doc in (("batches_served", "batches_served", "Batch shards served"),
                                   ("cache_hits", "cache_hits", "Records read from the cache"),
                                   ("cache_misses", "cache_misses", "Records missing or damaged in the cache"),
                                   ("encoded", "encoded_samples", "Samples encoded on a miss")):
            c = CounterMetricFamily(f"mmdit_{metric}", doc, labels=["producer"])
            for name, counters in sorted(producers.items()):
                c.add_metric([name], counters[field])
            yield c
