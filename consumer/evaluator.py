"""The evaluator: a process that follows a run's checkpoints as they are published and evaluates
each one (`mmdit evaluate RUN_DIR`, launch/evaluate.py), so the trainer ranks never wait for it.

For each complete checkpoint it runs the evaluations due at its step (config/train.py
`evaluations_due`: the held-out loss every eval.every, previews every eval.sample_every, text
rendering every eval.text_every) with consumer/evaluations.py, the code the trainer ranks run
with train.eval_on=trainer, on the weights loaded at its own TP size (any TP loads any
checkpoint; `eval.evaluator_tp`, default 1). Results are the trainer's: the same records in
metrics.jsonl, each tagged with its checkpoint (`"checkpoint": "step_00000040"`), the same
samples/step_N/ and eval/step_N/, the same TensorBoard tags (an event file of its own).

What is done is read back from metrics.jsonl (the records of each step), so a restarted
evaluator picks up where it was and never repeats work the trainer did itself. When it falls
behind, it evaluates the newest checkpoint with work left and records each older one it passed
over (`"eval": "skipped"`), so a slow evaluation never piles up (up to eval.evaluator_backlog
waiting checkpoints are taken oldest first: a moment's delay skips nothing). It holds a checkpoint for
reading (consumer/checkpoint.py `reading`: a shared flock) while it loads the weights, and
retention defers deleting a checkpoint so held.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from mmdit.config.job import JobConfig
from mmdit.config.train import EVALUATIONS
from mmdit.consumer.checkpoint import CHECKPOINTS, MODEL, TRAINER, checkpoint_problems, checkpoints, reading, step_of
from mmdit.consumer.metrics import METRICS, MetricsWriter
from mmdit.utils.jsonl_tail import JsonlTail

log = logging.getLogger("mmdit.evaluator")

_KIND_OF_RECORD = {True: "loss", "preview": "previews", "text_rendering": "text_rendering"}
MAX_GONE = 100
"""At most this many steps without a checkpoint are recorded as skipped at once (the newest): an
evaluator first started on a long run does not write a line for every step it never saw."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


class Done:
    """What metrics.jsonl says was evaluated (or skipped), per step; followed incrementally."""

    def __init__(self, run_dir: Path):
        self.tail = JsonlTail(Path(run_dir) / METRICS)
        self.by_step: dict[int, set[str]] = {}

    def refresh(self) -> dict[int, set[str]]:
        records, restarted = self.tail.read()
        if restarted:  # a resumed trainer dropped the records after its checkpoint
            self.by_step = {}
        for r in records:
            kind = r.get("eval")
            if not kind or not isinstance(r.get("step"), int):
                continue
            done = self.by_step.setdefault(r["step"], set())
            if kind == "skipped":
                done.update(EVALUATIONS)
            elif kind in _KIND_OF_RECORD:
                done.add(_KIND_OF_RECORD[kind])
        return self.by_step


class RunEvaluator:
    """Evaluates the checkpoints of `run_dir`; collective over the evaluator's own ranks (TP)."""

    def __init__(self, cfg: JobConfig, run_dir: Path, tp: int = 1):
        self.cfg, self.run_dir, self.tp = cfg, Path(run_dir), tp
        self.built = None  # the model, built at the first checkpoint
        self.evaluations = None
        self.done = Done(run_dir)
        self.metrics = None
        self.evaluated: list[int] = []
        self.skipped: list[int] = []

    # ------------------------------------------------------------------------- deciding

    def pending(self) -> tuple[list[tuple[str, list[str]]], int, list[tuple[str, list[str]]]]:
        """(complete checkpoints with evaluations left, newest first, each with them; the newest
        complete checkpoint's step, 0 when there is none; the steps since the last one evaluated
        whose evaluations are due but that have no checkpoint to evaluate: retention deleted it
        before the evaluator came, or none was saved, at most MAX_GONE of them). Read by rank 0."""
        done = self.done.refresh()
        complete = [p for p in checkpoints(self.run_dir) if (p / TRAINER).is_file()]
        work = []
        for path in complete:
            left = [k for k in self._due(step_of(path)) if k not in done.get(step_of(path), ())]
            if left:
                work.append((path.name, left))
        newest = step_of(complete[0]) if complete else 0
        present, floor = {step_of(p) for p in complete}, max(done, default=0)
        everies = [e for e in (self.cfg.eval.every, self.cfg.eval.sample_every, self.cfg.eval.text_every) if e]
        candidates = sorted({s for e in everies for s in range(floor - floor % e + e, newest, e)} - present)
        gone = [(checkpoint_name(s), left) for s in candidates[-MAX_GONE:]
                if (left := [k for k in self._due(s) if k not in done.get(s, ())])]
        return work, newest, gone

    def _due(self, step: int) -> list[str]:
        self._setup()
        return self.evaluations.due(step)

    def decide(self) -> dict:
        """Rank 0's decision, on every rank: the checkpoint to evaluate next and the older ones it
        passes over (with more than eval.evaluator_backlog waiting: the newest, passing over the
        rest; else the oldest, passing over none), and the newest complete step."""
        from mmdit.parallel.state import all_gather_objects

        decision = None
        if self.rank == 0:
            work, newest, gone = self.pending()
            behind = len(work) > self.cfg.eval.evaluator_backlog
            target = (work[0] if behind else work[-1]) if work else None
            decision = {"target": target, "skipped": work[1:] if behind else [], "newest": newest, "gone": gone}
        return all_gather_objects(decision)[0]

    # ------------------------------------------------------------------------- doing

    def follow(self, stop: threading.Event, until_step: int = 0, poll_s: float = 2.0) -> dict:
        """Evaluate checkpoints as they are published until `stop` is set (on any rank) or, with
        `until_step`, once a checkpoint of that step or later has nothing left to evaluate."""
        from mmdit.parallel.state import any_rank_true

        self._setup()
        while not any_rank_true(stop.is_set()):
            decision = self.decide()
            for name, kinds in decision["gone"]:
                self.skip(name, kinds, "no checkpoint of this step was left to evaluate (retention deleted it "
                                       "before the evaluator came to it, or none was saved)")
            for name, kinds in decision["skipped"]:
                self.skip(name, kinds, f"a newer checkpoint ({decision['target'][0]}) was published before it was "
                                       "evaluated")
            if decision["target"] is not None:
                self.evaluate(*decision["target"], stop=stop)
                continue
            if until_step and decision["newest"] >= until_step:
                break
            stop.wait(poll_s)
        return {"evaluated": self.evaluated, "skipped": self.skipped}

    def evaluate(self, name: str, kinds: list[str], stop: threading.Event | None = None) -> list[dict]:
        """Load checkpoint `name` and run `kinds` on it; the records written (rank 0)."""
        from mmdit.parallel.state import all_ranks_true, any_rank_true

        self._setup()
        path, step = self.run_dir / CHECKPOINTS / name, step_of(Path(name))
        problem = self._load(path)
        if not all_ranks_true(problem is None):
            self.skip(name, kinds, f"could not be read: {problem or 'on another evaluator rank'}")
            return []
        log.info("evaluating %s: %s", name, ", ".join(kinds))
        records = []
        for kind in kinds:
            if stop is not None and any_rank_true(stop.is_set()):
                break
            for record in self.evaluations.run(self.built.model, self.built.plan, step, [kind]):
                record = {**record, "checkpoint": name}
                self.metrics.write_eval(step, record)
                records.append(record)
        self.evaluated.append(step)
        return records

    def skip(self, name: str, kinds: list[str], reason: str) -> None:
        step = step_of(Path(name))
        log.warning("skipping %s (%s): %s", name, ", ".join(kinds), reason)
        self.skipped.append(step)
        self.metrics.write_eval(step, {"eval": "skipped", "evaluations": kinds, "checkpoint": name, "reason": reason})

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    # ------------------------------------------------------------------------- the model

    def _setup(self) -> None:
        """The process groups, the evaluations (held-out samples read) and the metrics writer."""
        if self.metrics is not None:
            return
        from mmdit.consumer.evaluations import Evaluations
        from mmdit.parallel.state import dp_group, init_parallel

        dims = init_parallel(self.tp)
        self.evaluations = Evaluations(self.cfg, self.run_dir, dims, dp_group())
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0, tensorboard=self.cfg.train.tensorboard)

    def _load(self, path: Path) -> str | None:
        """Load the checkpoint's weights into this rank's shard, holding it for reading; what is
        wrong when it cannot be (deleted meanwhile, damaged), else None."""
        import torch.distributed as dist

        from mmdit.model.checkpoint import checkpoint_args, load_model

        with reading(path) as held:
            if not held:
                return "retention deleted it first"
            ema = self.cfg.eval.weights == "ema"  # eval.weights=ema: the checkpoint's EMA weights (parallel/ema.py)
            problems = [p for part in (f"{MODEL}/", *(["ema/"] if ema else []))
                        for p in checkpoint_problems(path, dist.get_rank(), dist.get_world_size(), only=part)]
            if problems:
                return "; ".join(problems)
            try:
                args = checkpoint_args(path / MODEL)
                if self.built is None or self.built.model.args != args:
                    self._build(args)
                load_model(self.built.model, path / MODEL)
                if ema:
                    from mmdit.parallel.ema import ema_dir_of, load_ema

                    load_ema(self.built.model, ema_dir_of(path / MODEL))
            except (OSError, ValueError, KeyError) as e:  # moved away (resume set it aside) or damaged
                return f"{type(e).__name__}: {e}"
        return None

    def _build(self, args) -> None:
        """This rank's shard at the evaluator's TP size, run as the trainer runs it (its dtype,
        layers, attention kernel, compile), so the same weights give the same numbers."""
        from mmdit.parallel.parallelize import parallelize

        parallel = dataclasses.replace(self.cfg.parallel, tp=self.tp, recompute="none",
                                       sequence_parallel=self.cfg.parallel.sequence_parallel and self.tp > 1)
        self.built = parallelize(args, parallel, dtype=self.cfg.train.dtype)
        self.built.model.requires_grad_(False)

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0
