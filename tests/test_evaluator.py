"""The evaluator process (`mmdit evaluate`, consumer/evaluator.py): the same results as the
evaluation on the trainer ranks for the same checkpoint (held-out losses, preview PNGs, the OCR
text-rendering evaluation), at another TP size too, and the newest checkpoint first when behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------- in process


def test_submit_starts_the_evaluator_beside_the_coordinator_following_the_run_dir(tmp_path):
    from mmdit.config.loader import load_config
    from mmdit.launch.slurm import render

    overrides = [f"run.dir={tmp_path / 'run'}", "eval.evaluator=true", "eval.every=100"]
    serve = next(line for line in render(load_config(overrides), overrides).splitlines() if " serve " in line)
    assert f"eval.evaluator_run={tmp_path / 'run'} " in serve and "eval.evaluator=true" in serve
    plain = ["run.dir=/r"]
    assert "evaluator_run" not in render(load_config(plain), plain)


def test_evaluations_due_and_who_runs_them():
    from mmdit.config.loader import load_config
    from mmdit.config.train import evaluates_on_evaluator, evaluations_due

    cfg = load_config(["eval.every=10", "eval.sample_every=20", "eval.text_every=40", "encoders.dir=enc"])
    assert [evaluations_due(cfg.eval, s) for s in (10, 20, 30, 40, 41)] == [
        ["loss"], ["loss", "previews"], ["loss"], ["loss", "previews", "text_rendering"], []]
    assert not evaluates_on_evaluator(cfg.train, cfg.eval)
    assert evaluates_on_evaluator(load_config(["eval.evaluator=true"]).train, load_config(["eval.evaluator=true"]).eval)
    on_trainer = load_config(["eval.evaluator=true", "train.eval_on=trainer"])
    assert not evaluates_on_evaluator(on_trainer.train, on_trainer.eval)


def test_what_is_left_to_evaluate_and_what_can_no_longer_be(tmp_path):
    """Checkpoints 30 and 40 wait; step 10 was evaluated; step 20's checkpoint is gone (retention)."""
    from mmdit.config.loader import load_config
    from mmdit.consumer.evaluator import RunEvaluator
    from mmdit.parallel.state import destroy_parallel

    for step in (30, 40, 45):  # 45: a stop's checkpoint, nothing due
        path = tmp_path / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "trainer.json").write_text("{}")
    (tmp_path / "checkpoints" / "step_00000050").mkdir()  # being written: not yet published
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval": True, "eval_loss": 1.0}) + "\n")
    cfg = load_config(["eval.every=10", "eval.max_samples=1", "train.tensorboard=false", f"run.dir={tmp_path}"])
    evaluator = RunEvaluator(cfg, tmp_path)
    try:
        work, newest, gone = evaluator.pending()
        assert work == [("step_00000040", ["loss"]), ("step_00000030", ["loss"])] and newest == 45
        assert gone == [("step_00000020", ["loss"])]
        assert evaluator.decide()["target"] == ("step_00000030", ["loss"])  # within the backlog: oldest first
        evaluator.cfg.eval.evaluator_backlog = 1
        decision = evaluator.decide()
        assert decision["target"] == ("step_00000040", ["loss"]) and decision["skipped"] == [("step_00000030", ["loss"])]
    finally:
        evaluator.close()
        destroy_parallel()


# ----------------------------------------------------------------------------- real processes

BASE = ["train.random_height=64", "train.random_width=64", "train.micro_batch_size=1", "optimizer.lr=1e-3",
        "optimizer.warmup_steps=1", "checkpoint.keep=0", "eval.max_samples=3", "eval.sigmas=2",
        "eval.sample_size=64", "eval.sample_steps=3"]
TEXT = ["eval.text.limit=2", "eval.text.width=64", "eval.text.height=64", "eval.text.steps=2",
        "eval.text.alignment_model=none"]


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def evals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("eval")]


def without_evaluations(run: Path, copy: Path) -> Path:
    """A copy of a run as the trainer left it with the evaluations on an evaluator: checkpoints
    and step records only."""
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("samples", "eval", "tensorboard"))
    lines = (copy / "metrics.jsonl").read_text().splitlines(keepends=True)
    (copy / "metrics.jsonl").write_text("".join(line for line in lines if not json.loads(line).get("eval")))
    return copy


def loss_record(records: list[dict], step: int) -> dict:
    (record,) = [r for r in records if r["step"] == step and r["eval"] is True]
    return record


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_evaluator_gives_the_trainers_results_and_takes_the_newest_checkpoint_when_behind(tmp_path,
                                                                                            tiny_encoders_dir):
    """Checkpoints of steps 2 and 4, evaluated on the trainer (held-out loss at 2 and 4; previews
    and text rendering at 4); then by the evaluator, started late with no backlog allowed: it
    evaluates step 4 to the same numbers and the same bytes, and records step 2 as skipped."""
    trained = tmp_path / "trained"
    cli("train", f"run.dir={trained}", *BASE, *TEXT, "train.steps=4", "checkpoint.every=2", "eval.every=2",
        "eval.sample_every=4", "eval.text_every=4", f"encoders.dir={tiny_encoders_dir}", "train.eval_on=trainer")
    run = without_evaluations(trained, tmp_path / "evaluated")
    done = cli("evaluate", str(run), "until_step=4", "poll_s=0.2", "eval.evaluator_backlog=0")
    assert json.loads(done.stdout.splitlines()[-1]) == {"event": "evaluated", "evaluated": [4], "skipped": [2]}
    records = evals(run)
    (skipped,) = [r for r in records if r["eval"] == "skipped"]
    assert skipped["step"] == 2 and skipped["evaluations"] == ["loss"] and "step_00000004" in skipped["reason"]
    ours = loss_record(records, 4)
    assert ours.pop("checkpoint") == "step_00000004"
    assert ours == loss_record(evals(trained), 4)  # equal losses, to the last bit
    (preview,) = [r for r in records if r["eval"] == "preview"]
    assert preview == {"step": 4, "eval": "preview", "dir": "samples/step_00000004", "images": 3,
                       "checkpoint": "step_00000004"}
    pngs = sorted(p.name for p in (trained / "samples" / "step_00000004").glob("*.png"))
    assert pngs == ["00.png", "01.png", "02.png", "grid.png"]
    for name in pngs:
        assert (run / preview["dir"] / name).read_bytes() == (trained / preview["dir"] / name).read_bytes(), name
    (text,) = [r for r in records if r["eval"] == "text_rendering"]
    (reference,) = [r for r in evals(trained) if r["eval"] == "text_rendering"]
    for key in ("word_accuracy", "one_minus_ned", "by_language", "by_kind", "prompts", "dir"):
        assert text[key] == reference[key], key
    for image in (trained / text["dir"]).glob("*.png"):
        assert (run / text["dir"] / image.name).read_bytes() == image.read_bytes(), image.name
    again = cli("evaluate", str(run), "until_step=4", "poll_s=0.2")  # a restarted evaluator: nothing left to do
    assert json.loads(again.stdout.splitlines()[-1]) == {"event": "evaluated", "evaluated": [], "skipped": []}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tp2_checkpoint_evaluated_on_one_process(tmp_path, tiny_encoders_dir):
    """A TP=2 trainer's checkpoint, evaluated by a one-process evaluator: the held-out loss of
    the trainer's own evaluation (to rounding: the heads are summed in another order), and its
    previews to within 2 levels, as `mmdit sample` is."""
    import numpy as np
    from PIL import Image

    trained = tmp_path / "tp2"
    cli("train", f"run.dir={trained}", *BASE, "train.steps=2", "eval.every=2", "eval.sample_every=2",
        "launch.nproc=2", "parallel.tp=2", f"encoders.dir={tiny_encoders_dir}", "train.eval_on=trainer")
    run = without_evaluations(trained, tmp_path / "evaluated")
    cli("evaluate", str(run), "until_step=2", "poll_s=0.2")
    ours, reference = loss_record(evals(run), 2), loss_record(evals(trained), 2)
    assert ours["eval_samples"] == reference["eval_samples"] == 3
    assert ours["eval_loss_per_sigma"] == pytest.approx(reference["eval_loss_per_sigma"], abs=1e-5)
    for i in range(3):
        a, b = (np.asarray(Image.open(r / "samples" / "step_00000002" / f"{i:02d}.png"), dtype=np.int16)
                for r in (run, trained))
        assert np.abs(a - b).max() <= 2
