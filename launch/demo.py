"""`mmdit demo`: the whole local pipeline on this machine, from nothing to a trained checkpoint.

    tiny encoders -> synthetic shards -> mmdit produce (score, filter, bucket, encode, cache)
    -> mmdit annotate (VL annotations and alignment scores into the manifest)
    -> mmdit serve (coordinator + producers, dashboard) -> mmdit train on 2 tensor-parallel ranks
    (batches over TensorPipe RPC), beside mmdit evaluate (held-out loss, previews, text rendering
    of each checkpoint, off the trainer ranks) -> mmdit sample (a few images)
    -> mmdit eval (text rendering read back by OCR, on a few prompts of the built-in set) -> summary

Each stage is the real command, run as its own process group and recorded in
run.dir/processes.json, its output in run.dir/logs/<stage>.log; stages whose output exists are
reused (produce is incremental: a rerun encodes nothing new). Everything lands in run.dir
(default runs/demo). Extra `key=value` overrides go to every stage and replace the demo's own
defaults (`launch.nproc=2 parallel.tp=1` trains on two data-parallel ranks instead). Ctrl-C or
SIGTERM stops the running stage (a trainer checkpoints first) and the data service, and with
them every process they started.

`--stage sft`, `--stage dpo` and `--stage grpo` post-train from the pretrain demo's last
checkpoint into run.dir/sft, run.dir/dpo and run.dir/grpo (launch/demo_post.py), running the
pretrain demo first when run.dir has no checkpoint; `stage=grpo` says the same.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mmdit.config import ConfigError
from mmdit.config.explain import sections
from mmdit.config.loader import load_config
from mmdit.config.train import PREVIEW_PROMPTS
from mmdit.launch.args import Action, Command, Flag, parse
from mmdit.utils.jsonl import read_jsonl
from mmdit.utils.processes import (
    ProcessTable,
    ServeProcess,
    child_env,
    ignore_repeated_sigterm,
    signal_group,
)

DEFAULTS = {"launch.nproc": "2", "parallel.tp": "2", "train.steps": "40", "checkpoint.every": "20",
            "eval.every": "10", "data.eval_fraction": "0.15", "train.log_samples": "true",
            "annotate.max_new_tokens": "24", "annotate.image_area": "3136",
            "eval.sample_every": "20", "eval.sample_size": "128", "eval.sample_steps": "8",
            "eval.evaluator": "true", "eval.text_every": "40", "eval.text.limit": "6", "eval.text.width": "128",
            "eval.text.height": "128", "eval.text.steps": "8",
            "encoders.dir": "${run.dir}/encoders"}
"""The demo's settings unless overridden: hybrid parallelism and every feature switched on; the
evaluations run in an evaluator process beside the trainer (its text rendering as `EVAL`'s)."""
EVAL = ["limit=6", "width=128", "height=128", "steps=8"]
"""The demo's text-rendering evaluation: one prompt of each language and kind, small and quick."""


def mmdit(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmdit.launch.cli", *args]


class Stages:
    """Runs stages one at a time, each in its own process group with its output in a log file,
    and stops the current one (and everything it started) on Ctrl-C or SIGTERM."""

    def __init__(self, table: ProcessTable, logs: Path, stop_timeout_s: float):
        self.table, self.logs, self.timeout = table, logs, stop_timeout_s
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, cmd: list[str], while_running=None) -> str:
        """Run `cmd`; returns its stdout. `while_running()` is called about twice a second."""
        print(f"== {name}", flush=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as log, open(log_path.with_suffix(".out"), "wb") as out:
            proc = subprocess.Popen(cmd, start_new_session=True, env=child_env(), stdout=out, stderr=log)
            self.table.add(name, f"demo_{name}", proc.pid)
            try:
                while proc.poll() is None:
                    if while_running is not None:
                        while_running()
                    time.sleep(0.5)
                code = proc.returncode
            except BaseException:  # KeyboardInterrupt, or SIGTERM turned into one
                self._stop(proc)
                raise
            finally:
                self.table.set_returncode(proc.pid, proc.returncode)
        if code:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemExit(f"mmdit demo: stage {name!r} failed with exit code {code} ({log_path}):\n  "
                             + "\n  ".join(tail))
        return log_path.with_suffix(".out").read_text(errors="replace")

    def _stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the stage's group (a trainer checkpoints, then exits); SIGKILL what is left after
        the stop timeout, or at once on Ctrl-C again."""
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


class TrainingBar:
    """A progress bar over metrics.jsonl while the trainer runs (the trainer's log is in a file)."""

    def __init__(self, metrics: Path, total: int):
        from tqdm import tqdm

        self.metrics, self.seen = metrics, 0
        self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, disable=not sys.stderr.isatty())

    def __call__(self) -> None:
        rows = read_jsonl(self.metrics)
        steps = [r for r in rows if not r.get("eval")]
        if steps and steps[-1]["step"] > self.seen:
            self.bar.update(steps[-1]["step"] - self.seen)
            self.seen = steps[-1]["step"]
            self.bar.set_postfix(loss=f"{steps[-1]['loss']:.3f}")

    def close(self) -> None:
        self.bar.close()


class Interrupt:
    """A signal handler: the first SIGINT or SIGTERM raises KeyboardInterrupt (the current stage
    is stopped); after it only Ctrl-C again does (cutting that stop short), a SIGTERM repeated by
    whoever signals the demo's process group changes nothing."""

    def __init__(self):
        self.stopping = False

    def __call__(self, signum, _frame) -> None:
        if self.stopping and signum == signal.SIGTERM:
            return
        self.stopping = True
        raise KeyboardInterrupt


VAE_FLAG = Flag("vae", "also fine-tune the tiny VAE's decoder on the synthetic renderings (`mmdit vae-train`, "
                       "a short opt-in stage at the end)")
STAGE_FLAG = Flag("stage", "pretrain (default) | sft | dpo | grpo: post-train from the pretrain demo's last "
                           "checkpoint (launch/demo_post.py; the pretrain demo runs first when run.dir has none) into "
                           "run.dir/sft, run.dir/dpo or run.dir/grpo", type=str, default="pretrain", metavar="STAGE")


@dataclass
class DemoKeys:
    stage: str = ""
    """The same as --stage, written as a key: `mmdit demo stage=grpo`."""


COMMAND = Command("demo", __doc__, actions=(Action(flags=(VAE_FLAG, STAGE_FLAG), keys=DemoKeys),),
                  sections=tuple(sections()))


def chosen_stage(args) -> str:
    """The stage `--stage` or `stage=` names (pretrain when neither); both, naming two, is an error."""
    from mmdit.launch.demo_post import STAGES

    flag, key = args.flags.stage, args.keys.stage
    if key and flag not in ("pretrain", key):
        raise ConfigError(f"mmdit demo: --stage {flag} and stage={key} name two stages; give one")
    stage = key or flag
    if stage not in STAGES:
        raise ConfigError(f"mmdit demo --stage must be one of {', '.join(STAGES)}, got {stage!r}")
    return stage


def main(argv: list[str]) -> int:
    args = parse(COMMAND, argv)
    stage = chosen_stage(args)
    argv = user = args.overrides
    given = {a.split("=", 1)[0] for a in argv}
    argv = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in given] + list(argv)
    cfg = load_config(argv)  # validates the overrides once, before any stage runs
    # Stages run with other run dirs (the service's is run.dir/service): pin the resolved path.
    argv = [a for a in argv if not a.startswith("encoders.dir=")] + [f"encoders.dir={cfg.encoders.dir}"]
    # Both explicitly: a process started in the background of a script inherits SIGINT ignored,
    # and `kill -INT` must still stop the demo and everything it started.
    interrupt = Interrupt()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    run = Path(cfg.run.dir)
    table = ProcessTable(run)
    table.add("demo", "demo", os.getpid())
    code = 1
    try:
        if stage == "pretrain" or _pretrained(run) is None:
            _run(cfg, argv, run, table, vae=args.flags.vae)
        if stage != "pretrain":
            from mmdit.launch.demo_post import run_post

            stages = Stages(table, run / "logs", cfg.launch.stop_timeout_s)
            run_post(stage, cfg, user, run, stages, table, _pretrained(run))
        code = 0
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        table.set_returncode(os.getpid(), code)
        if interrupt.stopping:
            ignore_repeated_sigterm()
    return 0


def _pretrained(run: Path) -> Path | None:
    """The model of the pretrain demo's newest checkpoint in `run`, if any."""
    from mmdit.consumer.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run)
    return None if latest is None else latest / "model"


def _run(cfg, argv: list[str], run: Path, table: ProcessTable, vae: bool = False) -> None:
    started = time.monotonic()
    encoders = Path(cfg.encoders.dir)
    shards = run / "shards"
    stages = Stages(table, run / "logs", cfg.launch.stop_timeout_s)
    common = [f"run.dir={run}", f"encoders.dir={encoders}", f"cache.dir={cfg.cache.dir}", *argv]
    if not (encoders / "vae").is_dir():
        stages.run("encoders", mmdit("make-tiny-encoders", str(encoders)))
    if not list(shards.glob("*.tar")):
        stages.run("synth", mmdit("synth", str(shards), *[a for a in argv if a.startswith("synth.")]))
    report = json.loads(stages.run("produce", mmdit("produce", f"data.shards={shards}/*.tar", *common)))
    print(f"   {report['accepted']} of {report['seen']} samples accepted, {report['encoded']} encoded, "
          f"{report['cache_hits']} already cached; categories {report['categories']}", flush=True)
    notes = json.loads(stages.run("annotate", mmdit("annotate", f"data.shards={shards}/*.tar", *common)))
    print(f"   {notes['done']} annotated ({notes['annotated']}; the tiny random VL writes no JSON), "
          f"{notes['alignment_scored']} alignment scores", flush=True)
    dp = cfg.launch.nproc // cfg.parallel.tp
    service = [f"service.dp_size={dp}"]
    print("== serve", flush=True)
    # any free port (service.port=0 unless overridden), which the trainer reads where serve published it
    # the demo starts the evaluator itself (below), on the trainer's run dir
    serve = ServeProcess([*common, f"run.dir={run / 'service'}", "service.producers=2", *service,
                          "eval.evaluator=false"])
    table.add("serve", "demo_serve", serve.proc.pid)
    evaluator = _start_evaluator(cfg, argv, run, table) if cfg.eval.evaluator else None
    print(f"   dashboard {serve.info['dashboard']}  (live while the demo trains; also `mmdit status {run}`)",
          flush=True)
    bar = TrainingBar(run / "metrics.jsonl", cfg.train.steps)
    try:
        stages.run("train", mmdit("train", *common, "train.data_source=service", *service, *serve.client_overrides),
                   while_running=bar)
        if evaluator is not None:  # it ends once the last checkpoint is evaluated
            print("== evaluate (the evaluator finishes the last checkpoint)", flush=True)
            try:
                if evaluator.wait(timeout=cfg.launch.stop_timeout_s):
                    print(f"   the evaluator failed (exit {evaluator.returncode}): {run / 'logs' / 'evaluate.log'}")
            except subprocess.TimeoutExpired:
                print(f"   the evaluator did not finish within {cfg.launch.stop_timeout_s:.0f} s: stopped", flush=True)
    finally:
        bar.close()
        if evaluator is not None:
            _stop(evaluator, cfg.service.shutdown_timeout_s)
            table.set_returncode(evaluator.pid, evaluator.returncode)
        serve.stop(timeout=2 * cfg.service.shutdown_timeout_s)
        table.set_returncode(serve.proc.pid, serve.proc.returncode)
    samples = run / "samples" / "final"
    stages.run("sample", mmdit("sample", str(run), *[f"prompt={p}" for p in PREVIEW_PROMPTS], f"encoders={encoders}",
                               "width=128", "height=128", "steps=8", f"out={samples}"))
    text = _text_eval(stages, run, encoders)
    if vae:
        _vae_stage(stages, run, encoders, shards)
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("last_eval_loss") is None:  # evaluated by the evaluator, not the trainer
        losses = [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]
        summary["last_eval_loss"] = losses[-1] if losses else None
    print(_summary(summary, run, samples, time.monotonic() - started, text), flush=True)


def _start_evaluator(cfg, argv: list[str], run: Path, table: ProcessTable) -> subprocess.Popen:
    """`mmdit evaluate` of the run, until the checkpoint of train.steps is evaluated (its log in
    logs/evaluate.log); in a process group of its own, as the stages. The demo's overrides go on
    top of the run's config.yaml, which may still be a previous run's when it starts."""
    with open(run / "logs" / "evaluate.log", "ab") as log:
        proc = subprocess.Popen(mmdit("evaluate", str(run), f"until_step={cfg.train.steps}", "poll_s=0.5", *argv),
                                start_new_session=True, env=child_env(), stdout=log, stderr=log)
    table.add("evaluator", "demo_evaluator", proc.pid)
    return proc


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def _vae_stage(stages: Stages, run: Path, encoders: Path, shards: Path) -> None:
    """`--vae`: a short decoder fine-tune of the tiny VAE on the synthetic renderings (a tiny
    random LPIPS backbone stands in for the VGG weights), into run.dir/vae/, with its export."""
    from mmdit.consumer.vae.perceptual import write_random_lpips

    vae_run, lpips = run / "vae", run / "vae" / "lpips"
    if not (lpips / "config.json").is_file():
        write_random_lpips(lpips)
    stages.run("vae-train", mmdit("vae-train", f"run.dir={vae_run}", f"encoders.dir={encoders}",
                                  f"vae.text_shards=['{shards}/*.tar']", "vae.text_fraction=1",
                                  f"vae.perceptual_dir={lpips}", "vae.crop_size=64", "vae.eval_size=96",
                                  "vae.micro_batch_size=8", "vae.steps=30", "vae.optimizer.lr=2e-3",
                                  "vae.optimizer.warmup_steps=0", "vae.eval_max_samples=8", "vae.eval_fraction=0.15"))
    summary = json.loads((vae_run / "summary.json").read_text())
    before, after = summary.get("before") or {}, summary.get("after") or {}
    if after:
        print(f"   VAE decoder: held-out PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, SSIM "
              f"{before['ssim']:.3f} -> {after['ssim']:.3f}, OCR word accuracy {before.get('word_accuracy')} -> "
              f"{after.get('word_accuracy')}; "
              f"pairs in {vae_run / after['dir']}, export {summary['export']}", flush=True)


def _text_eval(stages: Stages, run: Path, encoders: Path) -> dict | None:
    """`mmdit eval` of the newest checkpoint (results reused when that step was evaluated)."""
    from mmdit.consumer.checkpoint import latest_checkpoint, step_of
    from mmdit.consumer.text_eval import eval_dir, read_results

    latest = latest_checkpoint(run)
    if latest is None:
        return None
    out = eval_dir(run, step_of(latest))
    if not (out / "results.json").is_file():
        stages.run("eval", mmdit("eval", str(latest), f"encoders={encoders}", *EVAL))
    return {**read_results(out)["summary"], "page": str(out / "index.html")}


def _text_line(text: dict) -> str:
    per = ", ".join(f"{lang} {f['word_accuracy']:.3f}" for lang, f in text["by_language"].items())
    align = text.get("alignment")
    return (f"   text rendering (OCR, {text['prompts']} prompts): word accuracy {text['word_accuracy']:.3f} ({per}), "
            f"1-NED {text['one_minus_ned']:.3f}" + (f", alignment {align:.3f}" if align is not None else "")
            + f"; page {text['page']}")


def _summary(summary: dict, run: Path, samples: Path, seconds: float, text: dict | None = None) -> str:
    if not summary["steps_run"]:
        return "\n".join([f"== done: {run} is already trained (raise train.steps to go on); samples in {samples}",
                          *([_text_line(text)] if text else [])])
    eval_loss = summary.get("last_eval_loss")
    return "\n".join([
        f"== done in {seconds:.0f} s: {summary['steps_run']} steps on TP={summary['tp']} x DP={summary['dp']} "
        f"({summary['backend']})",
        f"   loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
        + (f", held-out loss {eval_loss:.4f}" if eval_loss is not None else "")
        + f", {summary['mean_samples_per_second']:.1f} samples/s, data wait "
        f"{100 * summary['mean_data_wait_fraction']:.1f}%",
        *([_text_line(text)] if text else []),
        f"   metrics {run / 'metrics.jsonl'}, checkpoints {run / 'checkpoints'}, samples {samples}/grid.png",
        f"   try: mmdit status {run}; mmdit sample {run} prompt=\"...\" out=DIR; mmdit eval {run}; "
        f"tensorboard --logdir {run}",
    ])
