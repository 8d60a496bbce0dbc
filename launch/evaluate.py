"""`mmdit evaluate RUN_DIR [until_step=N] [key=value ...]`: the evaluator of a run (consumer/evaluator.py).

Follows RUN_DIR's checkpoints as the trainer publishes them and evaluates each at its step: the
held-out flow loss (eval.every), the previews (eval.sample_every) and the text-rendering OCR
evaluation (eval.text_every), with results where the trainer puts its own (metrics.jsonl tagged
with the checkpoint, samples/step_N/, eval/step_N/, TensorBoard). Behind, it evaluates the newest
checkpoint and records the ones it skipped. Runs until SIGTERM/SIGINT or, with until_step=N,
until a checkpoint of step N or later has nothing left to evaluate.

Its settings are the run's own (RUN_DIR/config.yaml, written when the trainer starts: it waits
for it), with `key=value` overrides on top; it runs at its own TP size, `eval.evaluator_tp`
(default 1: one process loads a checkpoint of any TP size), as that many local ranks.
`mmdit serve eval.evaluator=true` (and `mmdit submit`, `mmdit demo`) start it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mmdit.config import ConfigError
from mmdit.launch.args import Action, Command, parse


@dataclass
class EvaluateArgs:
    """`mmdit evaluate`'s own keys."""

    until_step: int = 0
    """Exit once a checkpoint of this step or a later one has nothing left to evaluate (0: follow
    until stopped)."""
    poll_s: float = 2.0
    """How often to look for newly published checkpoints, in seconds."""
    wait_s: float = 3600.0
    """How long to wait for the run's config.yaml (written when its trainer starts)."""

    def __post_init__(self):
        if self.until_step < 0 or self.poll_s <= 0 or self.wait_s < 0:
            raise ValueError("until_step and wait_s must be >= 0, poll_s > 0")


COMMAND = Command("evaluate", __doc__, actions=(Action(
    paths={"RUN_DIR": "the run directory whose checkpoints to follow"}, keys=EvaluateArgs),))


def run_config(run_dir: Path, overrides: list[str]):
    """The run's config (config.yaml) with `overrides` on top, run.dir pinned to `run_dir`."""
    from omegaconf import OmegaConf

    from mmdit.config.job import JobConfig
    from mmdit.config.loader import to_job_config, upgrade_overrides

    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(run_dir / "config.yaml"),
                                 OmegaConf.from_dotlist(upgrade_overrides(overrides)))
    except Exception as e:  # omegaconf raises many types: one line naming the key
        raise ConfigError(f"invalid config: {e}".splitlines()[0]) from None
    merged.run.dir = str(run_dir)
    return to_job_config(merged)


def _wait_for_config(run_dir: Path, wait_s: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + wait_s
    while not (run_dir / "config.yaml").is_file():
        if stop.wait(1.0) or time.monotonic() > deadline:
            return False
    return True


def main(argv: list[str]) -> int:
    from mmdit.launch.local import main_or_launch
    from mmdit.utils.processes import TABLE_ENV, ProcessTable, is_rank

    args = parse(COMMAND, argv)
    keys: EvaluateArgs = args.keys
    run_dir = Path(args.paths[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set() and signum == signal.SIGINT:  # Ctrl-C again: now
            raise KeyboardInterrupt
        logging.getLogger("mmdit.evaluator").warning("%s: stopping after the current evaluation",
                                                      signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if not _wait_for_config(run_dir, keys.wait_s, stop):
        if stop.is_set():
            return 0
        raise ConfigError(f"{run_dir}/config.yaml did not appear within {keys.wait_s:.0f} s: is a trainer running "
                          "there?")
    cfg = run_config(run_dir, args.overrides)
    tp = cfg.eval.evaluator_tp
    cfg.launch.master_port = 0  # never the trainer's: its ranks hold it
    code = main_or_launch("evaluate", argv, cfg, role="evaluator", nproc=tp)
    if code is not None:
        return code
    table = None
    if not is_rank() and not os.environ.get(TABLE_ENV):  # by hand; else the starter's table (serve's) has it
        table = ProcessTable(run_dir)
        table.add("evaluator", "evaluator", os.getpid())
    from mmdit.consumer.evaluator import RunEvaluator
    from mmdit.parallel.state import destroy_parallel

    evaluator = RunEvaluator(cfg, run_dir, tp)
    code = 1
    try:
        result = evaluator.follow(stop, until_step=keys.until_step, poll_s=keys.poll_s)
        if evaluator.rank == 0:
            print(json.dumps({"event": "evaluated", **result}), flush=True)
        code = 0
    finally:
        evaluator.close()
        destroy_parallel()
        if table is not None:
            table.set_returncode(os.getpid(), code)
    return 0
