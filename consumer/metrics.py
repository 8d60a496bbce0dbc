"""One metrics record per optimizer step: metrics.jsonl, the log line, and the run summary.

Evaluations add records of their own, told apart by their `eval` field:

    {"step": 40, "eval": true, "eval_loss": 0.80, ...}                    held-out loss (consumer/evaluation.py)
    {"step": 40, "eval": "text_rendering", "word_accuracy": 0.41,         OCR text rendering
     "one_minus_ned": 0.38, "alignment": 0.27, "by_language": {...},     (consumer/text_eval/, `mmdit eval`)
     "by_kind": {...}, "prompts": 100, "dir": "eval/step_00000040", ...}

    {"step": 40, "eval": "preview", "dir": "samples/step_00000040",      the fixed prompts' images
     "images": 3}                                                         (consumer/preview.py)
    {"step": 30, "eval": "skipped", "evaluations": ["loss"],             a checkpoint the evaluator
     "reason": "..."}                                                     passed over (it fell behind)

so a reader of training steps skips every record with a truthy `eval`. Records the evaluator
process writes (consumer/evaluator.py) also name the checkpoint they come from
(`"checkpoint": "step_00000040"`); the trainer's own come from its live weights at that step,
which are that checkpoint's. Several processes append to metrics.jsonl (a trainer's rank 0, the
evaluator, `mmdit eval`): every record is one O_APPEND write (`append_record`), so lines never
interleave.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("mmdit.train")

METRICS = "metrics.jsonl"
TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "samples_per_second", "image_tokens_per_second", "tflops_per_gpu",
                       "mfu", "data_wait_fraction", "config_version", "step_time_s", "checkpoint_stall_s",
                       "eval_stall_s")


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    samples_per_second: float
    image_tokens_per_second: float
    tflops_per_gpu: float
    mfu: float | None
    """Model FLOPs utilization; None where the device's peak is unknown (a CPU)."""
    data_wait_fraction: float
    config_version: int
    step_time_s: float
    global_batch_size: int
    skipped: bool = False
    """The loss or gradient was not finite: no optimizer update was made."""
    objective: dict[str, float] = field(default_factory=dict)
    """Figures the objective reports beside its loss (consumer/objectives.py); none for flow."""
    data_wait_s: float = 0.0
    """Seconds of this step spent waiting for batches (part of step_time_s)."""
    checkpoint_stall_s: float = 0.0
    """Seconds the loop spent on checkpoints since the previous step ended: a synchronous save
    whole; an asynchronous one's copy to host memory and publish."""
    eval_stall_s: float = 0.0
    """Seconds the loop spent on evaluation, previews and text rendering since the previous step
    ended (none when an evaluator process runs them)."""
    wall_s: float = 0.0
    """Wall time from the end of the previous step (or the loop's start) to the end of this one:
    step_time_s, the stalls, and what little else the loop does."""
    peak_memory_gib: float | None = None
    """This rank's `torch.cuda.max_memory_allocated()` since the run started, GiB (what
    model/memory.py's `Memory.allocated` predicts); None on a CPU."""

    def telemetry(self) -> dict:
        """What a trainer reports to the coordinator (dataservice/telemetry.py TRAINER_FIELDS)."""
        return {"step": self.step, "loss": self.loss, "samples_per_second": self.samples_per_second,
                "image_tokens_per_second": self.image_tokens_per_second, "tflops_per_device": self.tflops_per_gpu,
                "mfu": self.mfu, "data_wait_fraction": self.data_wait_fraction, "config_version": self.config_version,
                "objective": dict(self.objective or {})}

    def log_line(self) -> str:
        return (f"step {self.step:>6} | loss {self.loss:.4f} | lr {self.lr:.2e} | grad_norm {self.grad_norm:.3f} | "
                f"{self.samples_per_second:.2f} samples/s | {self.tflops_per_gpu:.2f} TFLOP/s/dev | "
                f"mfu {'n/a' if self.mfu is None else f'{100 * self.mfu:.1f}%'} | "
                f"data wait {100 * self.data_wait_fraction:.1f}%" + (" | SKIPPED" if self.skipped else ""))


@dataclass
class WallTime:
    """Where a trainer's wall time went, summed over its steps: in steps (computing), waiting for
    data, stalled on checkpoints, stalled on evaluation, and the rest. Reported as totals, so a
    reader that misses reports (the coordinator gets the latest one per ack) loses nothing."""

    wall_s: float = 0.0
    step_s: float = 0.0
    """Step time less data wait: the time the devices had work."""
    data_wait_s: float = 0.0
    checkpoint_stall_s: float = 0.0
    eval_stall_s: float = 0.0

    def add(self, m: StepMetrics) -> None:
        self.wall_s += m.wall_s
        self.step_s += m.step_time_s - m.data_wait_s
        self.data_wait_s += m.data_wait_s
        self.checkpoint_stall_s += m.checkpoint_stall_s
        self.eval_stall_s += m.eval_stall_s

    def add_stall(self, checkpoint_s: float = 0.0, eval_s: float = 0.0) -> None:
        """Stalls after the last step (the final save): they end the run's wall time."""
        self.wall_s += checkpoint_s + eval_s
        self.checkpoint_stall_s += checkpoint_s
        self.eval_stall_s += eval_s

    @property
    def other_s(self) -> float:
        return max(0.0, self.wall_s - self.step_s - self.data_wait_s - self.checkpoint_stall_s - self.eval_stall_s)

    def fractions(self) -> dict[str, float | None]:
        """Each part's share of the wall time (None before the first step)."""
        parts = {"steps": self.step_s, "data_wait": self.data_wait_s, "checkpoint_stall": self.checkpoint_stall_s,
                 "eval_stall": self.eval_stall_s, "other": self.other_s}
        return {k: (v / self.wall_s if self.wall_s > 0 else None) for k, v in parts.items()}

    def totals(self) -> dict[str, float]:
        """The telemetry fields (dataservice/telemetry.py WALL_FIELDS)."""
        return {"wall_total_s": self.wall_s, "step_total_s": self.step_s, "data_wait_total_s": self.data_wait_s,
                "checkpoint_stall_total_s": self.checkpoint_stall_s, "eval_stall_total_s": self.eval_stall_s}


class MetricsWriter:
    """Appends metrics.jsonl (rank 0 only) and keeps what summary.json reports."""

    def __init__(self, run_dir: Path, enabled: bool, log_every: int = 1, tensorboard: bool = False):
        self.enabled, self.log_every = enabled, max(1, log_every)
        self.path = run_dir / METRICS
        self.board = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10)
        self.records: list[StepMetrics] = []
        self.evals: list[dict] = []
        self.wall = WallTime()
        self.started = time.time()

    def write(self, metrics: StepMetrics) -> None:
        self.records.append(metrics)
        self.wall.add(metrics)
        if self.enabled:
            record = asdict(metrics)
            if not record["objective"]:
                del record["objective"]
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if metrics.step % self.log_every == 0 or metrics.step == 1:
                log.info(metrics.log_line())
            if self.board is not None:
                for name in TENSORBOARD_SCALARS:
                    value = getattr(metrics, name)
                    if value is not None:
                        self.board.add_scalar(f"train/{name}", value, metrics.step)
                for name, value in metrics.objective.items():
                    self.board.add_scalar(f"objective/{name}", value, metrics.step)

    def write_eval(self, step: int, result: dict) -> None:
        """An evaluation record (the held-out loss of consumer/evaluation.py, or a text-rendering
        summary of consumer/text_eval/) in metrics.jsonl, TensorBoard and the log."""
        self.evals.append({"step": step, **result})
        if not self.enabled:
            return
        append_record(self.path, {"step": step, **result})
        log.info("step %6d | %s", step, eval_line(result))
        if self.board is not None:
            for name, value in eval_scalars(result).items():
                self.board.add_scalar(name, value, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None

    def summary(self, **extra) -> dict:
        steady = self.records[1:] or self.records  # the first step pays one-time warm-up costs
        mean = lambda key: sum(getattr(m, key) for m in steady) / max(1, len(steady))  # noqa: E731
        return {
            "steps_run": len(self.records),
            "final_step": self.records[-1].step if self.records else None,
            "first_loss": self.records[0].loss if self.records else None,
            "final_loss": self.records[-1].loss if self.records else None,
            "mean_samples_per_second": mean("samples_per_second"),
            "mean_tflops_per_gpu": mean("tflops_per_gpu"),
            "mean_mfu": None if any(m.mfu is None for m in steady) else mean("mfu"),
            "skipped_steps": sum(m.skipped for m in self.records),
            "last_eval_loss": next((e["eval_loss"] for e in reversed(self.evals) if "eval_loss" in e), None),
            "mean_data_wait_fraction": mean("data_wait_fraction"),
            "wall_time_s": time.time() - self.started,
            "wall_fractions": self.wall.fractions(),
            "checkpoint_stall_s": self.wall.checkpoint_stall_s,
            "eval_stall_s": self.wall.eval_stall_s,
            **extra,
        }


def append_record(path: Path, record: dict) -> None:
    """One JSON line, in one O_APPEND write: lines of several writers (a trainer and `mmdit
    eval` on the same run) never interleave."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def eval_line(result: dict) -> str:
    """An evaluation record as the log shows it."""
    if result.get("eval") == "preview":
        return f"previews: {result['images']} images in {result['dir']}"
    if result.get("eval") == "skipped":
        return f"skipped {', '.join(result['evaluations'])}: {result['reason']}"
    if "eval_loss" in result:
        return f"eval loss {result['eval_loss']:.4f} over {result['eval_samples']} held-out samples"
    by = result.get("by_language", {})
    per = ", ".join(f"{lang} {f['word_accuracy']:.3f}" for lang, f in by.items() if f.get("word_accuracy") is not None)
    align = result.get("alignment")
    return (f"text rendering: word accuracy {result['word_accuracy']:.3f} ({per}), 1-NED {result['one_minus_ned']:.3f}"
            + (f", alignment {align:.3f}" if align is not None else "") + f" over {result['prompts']} prompts")


def eval_scalars(result: dict) -> dict[str, float]:
    """TensorBoard scalars of an evaluation record: eval/loss, or eval/text/* (overall, per
    language and per kind)."""
    if "eval_loss" in result:
        return {"eval/loss": result["eval_loss"]}
    if result.get("eval") != "text_rendering":
        return {}
    out = {}
    groups = [("", result)] + [(f"{name}/", f) for table in ("by_language", "by_kind")
                               for name, f in result.get(table, {}).items()]
    for prefix, figures in groups:
        for metric in ("word_accuracy", "one_minus_ned", "alignment"):
            if figures.get(metric) is not None:
                out[f"eval/text/{prefix}{metric}"] = figures[metric]
    return out


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a per-step JSONL log (metrics.jsonl, samples.jsonl) after `step`: a run
    resumed from step N logs steps N+1... again, so each step is in the file once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) != len(lines):
        from mmdit.utils.atomic import atomic_write_text

        atomic_write_text(path, "".join(kept))


def _step_of(line: str) -> int | None:
    """The step of one JSONL line; None for a torn line (a crash mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
