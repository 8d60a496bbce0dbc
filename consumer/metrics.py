"""One metrics record per optimizer step: metrics.jsonl, the log line, and the run summary."""

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("mmdit.train")

METRICS = "metrics.jsonl"
TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "samples_per_second", "image_tokens_per_second", "tflops_per_gpu",
                       "mfu", "data_wait_fraction", "config_version", "step_time_s")


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

    def telemetry(self) -> dict:
        """What a trainer reports to the coordinator (dataservice/telemetry.py TRAINER_FIELDS)."""
        return {"step": self.step, "loss": self.loss, "samples_per_second": self.samples_per_second,
                "image_tokens_per_second": self.image_tokens_per_second, "tflops_per_device": self.tflops_per_gpu,
                "mfu": self.mfu, "data_wait_fraction": self.data_wait_fraction, "config_version": self.config_version}

    def log_line(self) -> str:
        return (f"step {self.step:>6} | loss {self.loss:.4f} | lr {self.lr:.2e} | grad_norm {self.grad_norm:.3f} | "
                f"{self.samples_per_second:.2f} samples/s | {self.tflops_per_gpu:.2f} TFLOP/s/dev | "
                f"mfu {'n/a' if self.mfu is None else f'{100 * self.mfu:.1f}%'} | "
                f"data wait {100 * self.data_wait_fraction:.1f}%" + (" | SKIPPED" if self.skipped else ""))


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
        self.started = time.time()

    def write(self, metrics: StepMetrics) -> None:
        self.records.append(metrics)
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
        """An evaluation record (consumer/evaluation.py) in metrics.jsonl, TensorBoard and the log."""
        self.evals.append({"step": step, **result})
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **result}) + "\n")
        log.info("step %6d | eval loss %.4f over %d held-out samples", step, result["eval_loss"], result["eval_samples"])
        if self.board is not None:
            self.board.add_scalar("eval/loss", result["eval_loss"], step)

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
            "last_eval_loss": self.evals[-1]["eval_loss"] if self.evals else None,
            "mean_data_wait_fraction": mean("data_wait_fraction"),
            "wall_time_s": time.time() - self.started,
            **extra,
        }


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
