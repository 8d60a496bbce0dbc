"""Live figures of a job, gathered by the coordinator: trainers report with their acks, producers
with their lease heartbeats (no extra connection per step), and evaluations are read from the
trainer's metrics.jsonl (whoever wrote them: the trainer ranks or the evaluator process).

`Telemetry` keeps the latest report of every DP rank and producer, a bounded time series for the
dashboard and the evaluation records; `PrometheusCollector` turns them, with the coordinator's
own state, into the `mmdit_*` series of `/metrics` (prometheus_client's text format).

The coordinator's own health comes from `Coordinator.health()` once a second (`Telemetry.tick`):
calls answered by kind, how long its lock was held and waited for, its queues (batches pending
a producer, parked producer polls and locates), and its headroom: the inverse of the CPU its
process used per second (the coordinator's Python work cannot use more than one core), i.e. how
many times the running job's load it could take.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mmdit.utils.jsonl_tail import JsonlTail

TRAINER_FIELDS = ("step", "loss", "samples_per_second", "image_tokens_per_second", "tflops_per_device", "mfu",
                  "data_wait_fraction", "config_version")
"""What a trainer's DP rank reports after each step (mfu is None where the peak is unknown)."""
OBJECTIVE = "objective"
"""A trainer report's figures of its objective beyond the loss (consumer/objectives.py), by name:
DPO's reward_margin, preference_accuracy, policy_err_win, policy_err_lose; GRPO's reward_mean,
reward_std, rollout_s, reward_wait_s, update_s, images, ... (consumer/grpo_objective.py)."""
MAX_OBJECTIVE_FIGURES = 32
"""At most this many objective figures are kept per report (names are the trainer's to choose)."""


def objective_figures(report: dict) -> dict[str, float]:
    """The numeric objective figures of a trainer report, names as given (at most MAX_OBJECTIVE_FIGURES)."""
    figures = report.get(OBJECTIVE)
    if not isinstance(figures, dict):
        return {}
    clean = {str(k)[:64]: _number(v) for k, v in sorted(figures.items())[:MAX_OBJECTIVE_FIGURES]}
    return {k: v for k, v in clean.items() if v is not None}
WALL_FIELDS = ("wall_total_s", "step_total_s", "data_wait_total_s", "checkpoint_stall_total_s", "eval_stall_total_s")
"""Where the trainer's wall time went, totals since it started (consumer/metrics.py WallTime):
in steps (less data wait), waiting for data, stalled on checkpoints, stalled on evaluation."""
WALL_PARTS = {"steps": "step_total_s", "data_wait": "data_wait_total_s", "checkpoint_stall": "checkpoint_stall_total_s",
              "eval_stall": "eval_stall_total_s"}


def wall_fractions(report: dict) -> dict[str, float | None]:
    """Each part's share of the trainer's wall time (and `other`, the rest), from a report's totals."""
    wall = report.get("wall_total_s")
    if not wall:
        return {**{part: None for part in WALL_PARTS}, "other": None}
    out = {part: (report.get(total) or 0.0) / wall for part, total in WALL_PARTS.items()}
    return {**out, "other": max(0.0, 1.0 - sum(out.values()))}


class EvalRecords:
    """The evaluation records of a run's metrics.jsonl, followed as they are appended: the held-out
    loss and the text-rendering figures by step, the preview directories, the skipped count."""

    def __init__(self):
        self.run_dir: Path | None = None
        self.tail: JsonlTail | None = None
        self.clear()

    def clear(self) -> None:
        self.loss: dict[int, float] = {}
        self.text: dict[int, dict] = {}
        self.previews: list[str] = []
        self.skipped = 0

    def follow(self, run_dir: str | None) -> None:
        """Read what was appended to `run_dir`/metrics.jsonl since the last call."""
        if not run_dir:
            return
        if Path(run_dir) != self.run_dir:
            self.run_dir, self.tail = Path(run_dir), JsonlTail(Path(run_dir) / "metrics.jsonl")
            self.clear()
        records, restarted = self.tail.read()
        if restarted:
            self.clear()
        for r in records:
            step, kind = r.get("step"), r.get("eval")
            if not kind or not isinstance(step, int):
                continue
            if kind is True and _number(r.get("eval_loss")) is not None:
                self.loss[step] = r["eval_loss"]
            elif kind == "text_rendering":
                self.text[step] = {"word_accuracy": _number(r.get("word_accuracy")),
                                   "one_minus_ned": _number(r.get("one_minus_ned")),
                                   **{f"{lang}_word_accuracy": _number(f.get("word_accuracy"))
                                      for lang, f in (r.get("by_language") or {}).items() if isinstance(f, dict)}}
            elif kind == "preview" and isinstance(r.get("dir"), str):
                self.previews = (self.previews + [str(self.run_dir / r["dir"])])[-16:]
            elif kind == "skipped":
                self.skipped += 1

    def series(self) -> dict:
        loss_steps, text_steps = sorted(self.loss), sorted(self.text)
        return {"loss": {"step": loss_steps, "eval_loss": [self.loss[s] for s in loss_steps]},
                "text": {"step": text_steps, **{k: [self.text[s].get(k) for s in text_steps]
                                                for k in ("word_accuracy", "one_minus_ned", "en_word_accuracy",
                                                          "zh_word_accuracy")}},
                "skipped": self.skipped}
PRODUCER_FIELDS = ("batches_served", "cache_hits", "cache_misses", "encoded")
"""Counters a producer reports with each heartbeat (totals since it started)."""
CALL_KINDS = ("lease", "locate", "ack", "register")
"""The coordinator's calls counted by kind (`Coordinator.calls`)."""
HEALTH_FIELDS = ("batches_per_second", "lock_busy_fraction", "lock_wait_fraction", "cpu_fraction", "headroom",
                 "pending", "parked_producers", "parked_locates", *(f"{k}_per_second" for k in CALL_KINDS))
"""One point of the coordinator's health series (rates over the last tick)."""


class TimedLock:
    """A re-entrant lock that adds up how long it was held (outermost holds) and waited for."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._since = 0.0
        self.held_s = self.wait_s = 0.0

    def __enter__(self) -> TimedLock:
        asked = time.perf_counter()
        self._lock.acquire()
        if self._depth == 0:  # only the holder touches _depth and the totals
            self._since = time.perf_counter()
            self.wait_s += self._since - asked
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.held_s += time.perf_counter() - self._since
        self._lock.release()


def health_point(before: dict, after: dict) -> dict:
    """Rates between two `Coordinator.health()` snapshots, and the queues of the later one."""
    dt = after["time"] - before["time"]
    if dt <= 0:
        return {}
    cpu = (after["cpu_s"] - before["cpu_s"]) / dt
    point = {"time": after["time"], "batches_per_second": (after["batches_done"] - before["batches_done"]) / dt,
             "lock_busy_fraction": (after["lock_held_s"] - before["lock_held_s"]) / dt,
             "lock_wait_fraction": (after["lock_wait_s"] - before["lock_wait_s"]) / dt, "cpu_fraction": cpu,
             "headroom": 1.0 / cpu if cpu > 0 else None,
             **{k: after[k] for k in ("pending", "parked_producers", "parked_locates")}}
    for kind in CALL_KINDS:
        point[f"{kind}_per_second"] = (after["calls"][kind] - before["calls"][kind]) / dt
    return point


class Telemetry:
    def __init__(self, history_points: int = 4096, clock=time.time, run_dir: str | None = None):
        self.clock = clock
        self.lock = threading.Lock()
        self.trainers: dict[int, dict] = {}  # dp_rank -> latest report (+ "time")
        self.producers: dict[str, dict] = {}  # name -> latest counters (+ "time")
        self.points: deque = deque(maxlen=history_points)  # dashboard series, one per DP rank 0 report
        self.producer_points: deque = deque(maxlen=history_points)  # (time, alive, batches/s)
        self.health_points: deque = deque(maxlen=history_points)  # the coordinator's own (HEALTH_FIELDS)
        self._last_health: dict | None = None
        self.samples: list[str] = []  # directories of sample images trainers wrote, newest last
        self._last_served: tuple[float, float] | None = None
        self.run_dir = run_dir  # the trainer's, once one reports it; else the service's own
        self.evals = EvalRecords()
        self._evals_lock = threading.Lock()  # one reader of metrics.jsonl at a time

    def trainer_report(self, dp_rank: int, report: dict) -> None:
        if not isinstance(report, dict):
            return
        now = self.clock()
        clean = {k: _number(report.get(k)) for k in (*TRAINER_FIELDS, *WALL_FIELDS)}
        clean[OBJECTIVE] = objective_figures(report)
        with self.lock:
            if dp_rank == 0 and isinstance(report.get("run_dir"), str):
                self.run_dir = report["run_dir"]
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

    def tick(self, producers_alive: int, health: dict | None = None) -> None:
        """Called about once a second: one point of the producer series, and of the coordinator's
        health series from its `health()` snapshot."""
        now = self.clock()
        with self.lock:
            if health is not None:
                if self._last_health is not None and (point := health_point(self._last_health, health)):
                    self.health_points.append(point)
                self._last_health = health
            served = sum(p["batches_served"] for p in self.producers.values())
            rate = None
            if self._last_served is not None and now > self._last_served[0]:
                rate = max(0.0, served - self._last_served[1]) / (now - self._last_served[0])
            self._last_served = (now, served)
            self.producer_points.append({"time": now, "producers_alive": producers_alive,
                                         "batches_per_second": rate})

    def read_evaluations(self) -> dict:
        """The evaluation series (EvalRecords.series), after reading what was appended to the
        trainer's metrics.jsonl since the last call."""
        with self._evals_lock:
            self.evals.follow(self.run_dir)
            series = self.evals.series()
            previews = list(self.evals.previews)
        with self.lock:
            self.samples = list(dict.fromkeys(self.samples + previews))[-16:]
        return series

    def series(self) -> dict:
        """The dashboard's data: trainer and producer series (columns), where the trainer's wall
        time went (cumulative fractions), evaluations by step, latest reports."""
        evaluations = self.read_evaluations()
        with self.lock:
            points, prod, health = list(self.points), list(self.producer_points), list(self.health_points)
            fractions = [wall_fractions(p) for p in points]
            names = sorted({n for p in points for n in p.get(OBJECTIVE, {})})
            return {"trainer": {k: [p.get(k) for p in points] for k in ("time", *TRAINER_FIELDS)},
                    OBJECTIVE: {"time": [p["time"] for p in points],
                                **{n: [p.get(OBJECTIVE, {}).get(n) for p in points] for n in names}},
                    "wall": {"time": [p["time"] for p in points],
                             **{part: [f[part] for f in fractions] for part in (*WALL_PARTS, "other")}},
                    "evaluations": evaluations,
                    "producers": {k: [p[k] for p in prod] for k in ("time", "producers_alive", "batches_per_second")},
                    "coordinator": {k: [p.get(k) for p in health] for k in ("time", *HEALTH_FIELDS)},
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
        objective = GaugeMetricFamily("mmdit_objective", "The training objective's figures of the last step, mean "
                                      "over DP (DPO: reward_margin, preference_accuracy, policy_err_win, "
                                      "policy_err_lose; GRPO: reward_mean, reward_std, rollout_s, images, ...)", labels=["dp_rank", "figure"])
        for rank, report in sorted(trainers.items()):
            for name, value in sorted(report.get(OBJECTIVE, {}).items()):
                objective.add_metric([str(rank), name], value)
        yield objective
        yield from self._wall(trainers)
        yield from self._coordinator(self.coordinator.health(), self.telemetry)
        yield from self._evaluations(self.telemetry.read_evaluations())
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

    @staticmethod
    def _wall(trainers: dict) -> list:
        seconds = CounterMetricFamily("mmdit_trainer_wall_seconds", "Trainer wall time by where it went: steps "
                                      "(less data wait), data_wait, checkpoint_stall, eval_stall",
                                      labels=["dp_rank", "part"])
        in_steps = GaugeMetricFamily("mmdit_step_time_fraction", "Fraction of the trainer's wall time spent in "
                                     "steps (less data wait), since it started", labels=["dp_rank"])
        for rank, report in sorted(trainers.items()):
            if not report.get("wall_total_s"):
                continue
            for part, total in WALL_PARTS.items():
                seconds.add_metric([str(rank), part], report.get(total) or 0.0)
            in_steps.add_metric([str(rank)], wall_fractions(report)["steps"])
        return [seconds, in_steps]

    @staticmethod
    def _coordinator(health: dict, telemetry: Telemetry) -> list:
        """The coordinator's own load: totals now, rates and headroom of the last tick."""
        calls = CounterMetricFamily("mmdit_coordinator_calls", "Calls the coordinator answered, by kind",
                                    labels=["kind"])
        for kind in CALL_KINDS:
            calls.add_metric([kind], health["calls"][kind])
        out = [calls,
               CounterMetricFamily("mmdit_coordinator_lock_held_seconds", "Time the coordinator's lock was held",
                                   value=health["lock_held_s"]),
               CounterMetricFamily("mmdit_coordinator_lock_wait_seconds", "Time calls waited for the "
                                   "coordinator's lock", value=health["lock_wait_s"])]
        queues = GaugeMetricFamily("mmdit_coordinator_queue", "Coordinator queues: batches planned and not "
                                   "leased (pending), parked producer polls, parked locates", labels=["queue"])
        for queue in ("pending", "parked_producers", "parked_locates"):
            queues.add_metric([queue], health[queue])
        out.append(queues)
        with telemetry.lock:
            last = telemetry.health_points[-1] if telemetry.health_points else None
        if last is not None:
            out.append(GaugeMetricFamily("mmdit_coordinator_cpu_fraction", "CPU seconds per second of the "
                                         "coordinator's process (its Python work cannot use more than one core)",
                                         value=last["cpu_fraction"]))
            if last["headroom"] is not None:
                out.append(GaugeMetricFamily("mmdit_coordinator_headroom", "How many times the current load the "
                                             "coordinator could take (1 / cpu_fraction)", value=last["headroom"]))
        return out

    @staticmethod
    def _evaluations(series: dict) -> list:
        out = []
        loss = series["loss"]
        if loss["step"]:
            out.append(GaugeMetricFamily("mmdit_eval_loss", "Held-out flow loss of the newest evaluated checkpoint",
                                         value=loss["eval_loss"][-1]))
            out.append(GaugeMetricFamily("mmdit_eval_step", "Step of the newest held-out evaluation",
                                         value=loss["step"][-1]))
        text = series["text"]
        if text["step"]:
            accuracy = GaugeMetricFamily("mmdit_text_word_accuracy", "OCR word accuracy of the newest text-rendering "
                                         "evaluation", labels=["language"])
            for label, key in (("all", "word_accuracy"), ("en", "en_word_accuracy"), ("zh", "zh_word_accuracy")):
                if text[key][-1] is not None:
                    accuracy.add_metric([label], text[key][-1])
            out.append(accuracy)
            if text["one_minus_ned"][-1] is not None:
                out.append(GaugeMetricFamily("mmdit_text_one_minus_ned", "1 - normalized edit distance of the newest "
                                             "text-rendering evaluation", value=text["one_minus_ned"][-1]))
        out.append(CounterMetricFamily("mmdit_evaluations_skipped", "Checkpoints the evaluator passed over (behind)",
                                       value=series["skipped"]))
        return out
