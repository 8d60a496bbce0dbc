"""Where a trainer's wall time goes: evaluation and previews on the trainer ranks with synchronous
checkpoints, against an evaluator process with asynchronous checkpoints.

The demo's training, sized as `mmdit demo` runs it (the tiny model on 2 tensor-parallel ranks,
micro-batches of 2 at 256 px; random data here, so no cache to build): held-out evaluation every
`--eval-every` steps, previews of the three fixed prompts and checkpoints every `--save-every`, for
`--steps` steps, twice:

    trainer     train.eval_on=trainer checkpoint.async_save=false: every rank waits for each
                evaluation, preview and save (mmdit before the evaluator)
    evaluator   eval.evaluator=true checkpoint.async_save=true, with `mmdit evaluate` running
                beside the trainer: the trainer publishes a checkpoint at every step an evaluation
                is due and waits only for the copy to host memory (and the publish)

From each run's metrics.jsonl (consumer/metrics.py WallTime, summed over steps; the final save
counted from summary.json): the fraction of the trainer's wall time spent in steps (less data
wait), and where the rest went (data wait, checkpoint stall, evaluation stall, other), and the
checkpoint stall per save. The evaluator shares this machine's cores with the trainer, so its
steps are slower; the fraction is of the trainer's own wall time.

    python bench/wall_fraction.py [--steps 400 --eval-every 10 --save-every 20]  ->  bench/results/wall_fraction.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEMO = ["launch.nproc=2", "parallel.tp=2", "train.random_height=256", "train.random_width=256",
        "train.micro_batch_size=2", "eval.sample_size=128", "eval.sample_steps=8", "checkpoint.keep=3"]
"""The demo's training settings (launch/demo.py DEFAULTS), on random data."""


def mmdit(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmdit.launch.cli", *args]


def run(mode: str, work: Path, encoders: Path, steps: int, eval_every: int, save_every: int) -> dict:
    run_dir = work / mode
    common = [f"run.dir={run_dir}", f"encoders.dir={encoders}", f"train.steps={steps}", f"eval.every={eval_every}",
              f"eval.sample_every={save_every}", f"checkpoint.every={save_every}", *DEMO]
    if mode == "trainer":
        common += ["train.eval_on=trainer", "checkpoint.async_save=false"]
    else:
        common += ["eval.evaluator=true", "checkpoint.async_save=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    evaluator = None
    if mode == "evaluator":
        evaluator = subprocess.Popen(mmdit("evaluate", str(run_dir), f"until_step={steps}", "poll_s=0.5", *common),
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     start_new_session=True)
    started = time.monotonic()
    done = subprocess.run(mmdit("train", *common), capture_output=True, text=True, env=env)
    train_seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{mode}: mmdit train failed:\n{done.stderr[-3000:]}")
    evaluated = None
    if evaluator is not None:
        try:
            out, _ = evaluator.communicate(timeout=1800)
            evaluated = json.loads(out.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            os.killpg(evaluator.pid, signal.SIGKILL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if not r.get("eval")]
    summary = json.loads((run_dir / "summary.json").read_text())
    wall = sum(r["wall_s"] for r in step_rows)
    in_steps = sum(r["step_time_s"] - r["data_wait_s"] for r in step_rows)
    data_wait = sum(r["data_wait_s"] for r in step_rows)
    checkpoint, evaluation = summary["checkpoint_stall_s"], summary["eval_stall_s"]
    wall += checkpoint + evaluation - sum(r["checkpoint_stall_s"] + r["eval_stall_s"] for r in step_rows)  # the end
    saves = len({r["step"] for r in step_rows if r["step"] % save_every == 0} | {steps}) if mode == "trainer" else \
        len({r["step"] for r in step_rows if r["step"] % eval_every == 0 or r["step"] % save_every == 0} | {steps})
    return {
        "mode": mode, "steps": len(step_rows), "train_command_s": round(train_seconds, 1),
        "trainer_wall_s": round(wall, 2), "in_steps_s": round(in_steps, 2),
        "fraction_in_steps": round(in_steps / wall, 4),
        "fractions": {k: round(v, 4) if v is not None else None for k, v in summary["wall_fractions"].items()},
        "data_wait_s": round(data_wait, 2), "checkpoint_stall_s": round(checkpoint, 2),
        "eval_stall_s": round(evaluation, 2), "saves": saves,
        "checkpoint_stall_per_save_s": round(checkpoint / max(1, saves), 4),
        "median_step_s": round(sorted(r["step_time_s"] for r in step_rows)[len(step_rows) // 2], 4),
        "evaluations_recorded": {kind: sum(1 for r in rows if r.get("eval") == value)
                                 for kind, value in (("loss", True), ("preview", "preview"), ("skipped", "skipped"))},
        "evaluator": evaluated,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "wall_fraction.json"))
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(mmdit("make-tiny-encoders", str(work / "encoders")), check=True, capture_output=True)
        results = [run(mode, work, work / "encoders", a.steps, a.eval_every, a.save_every)
                   for mode in ("trainer", "evaluator")]
    out = {"benchmark": "wall_fraction", "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "settings": {"steps": a.steps, "eval_every": a.eval_every, "save_every": a.save_every, "demo": DEMO},
           "runs": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in results:
        print(f"{r['mode']:>9}: {100 * r['fraction_in_steps']:.1f}% of {r['trainer_wall_s']:.1f} s in steps; "
              f"checkpoint stall {r['checkpoint_stall_per_save_s'] * 1000:.0f} ms per save ({r['saves']} saves), "
              f"evaluation stall {r['eval_stall_s']:.1f} s, data wait {r['data_wait_s']:.1f} s")


if __name__ == "__main__":
    main()
