"""`mmdit demo --stage sft|dpo|grpo`: post-training from the pretrain demo's last checkpoint.

    sft  a curated key list (the sharper half of the cached text-to-image samples, by the manifest's
         blur score: a stand-in for a human-curated set) -> mmdit serve (data=sft, the list as
         data.filters.curated_list) -> mmdit train train=sft from the checkpoint, into run.dir/sft
    dpo  mmdit synth pairs=true (win: the caption's text rendered, lose: a corrupted string) ->
         mmdit produce (pair records into the demo's cache) -> mmdit serve (data=dpo) -> mmdit
         train train.objective=dpo from the checkpoint (the frozen reference: the same checkpoint,
         at the same TP), into run.dir/dpo
    grpo mmdit serve (no producers: the service is the RPC group the rewards travel on) -> one
         mmdit reward-worker (train.grpo.reward=ocr: the tiny encoders' VAE decodes, RapidOCR reads)
         -> mmdit train train.objective=grpo train.grpo.reward_service=true from the checkpoint,
         a few steps of 64x64 rollouts, into run.dir/grpo; the worker and the service are stopped
         at the end, also when a stage fails

Each runs the real commands as the pretrain demo does (launch/demo.py `Stages`), on the demo's
cache and encoders, at the demo's parallelism, and prints the loss, the lineage, for DPO the
implicit reward margin and preference accuracy, and for GRPO the reward per step. The pretrain
demo runs first when run.dir has no checkpoint yet.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mmdit.utils.jsonl import read_jsonl
from mmdit.utils.processes import ServeProcess, child_env

STAGES = ("pretrain", "sft", "dpo", "grpo")
POST = {"train.steps": "20", "checkpoint.every": "10", "eval.every": "0", "eval.sample_every": "0",
        "eval.text_every": "0", "eval.evaluator": "false", "train.log_samples": "true"}
"""The post-training runs' settings unless overridden: short, evaluations off (the pretrain demo's
evaluator follows only its own run)."""
DPO = {"train.objective": "dpo", "train.dpo.beta": "5000", "optimizer.lr": "5e-4", "optimizer.lr_schedule": "constant",
       "optimizer.warmup_steps": "0", "train.micro_batch_size": "4", "train.steps": "30"}
"""A pair's two renderings differ in a few letters, so their errors differ little: a large beta
and rate make 30 steps on the tiny model move the margin (the tiny demo: loss 0.693 -> 0.57)."""
GRPO = {"train.objective": "grpo", "train.grpo.reward": "ocr", "train.grpo.reward_service": "true",
        "train.grpo.width": "64", "train.grpo.height": "64", "train.grpo.sde_steps": "4",
        "train.grpo.group_size": "4", "train.grpo.prompts_per_step": "2",
        "train.steps": "3", "checkpoint.every": "3",
        "train.data_source": "random", "train.random_width": "32", "train.random_height": "32",
        "train.micro_batch_size": "1", "train.log_samples": "false"}
"""Small rollouts (2 prompts x 4 images of 64x64, 4 SDE steps) scored by OCR on one reward
worker: seconds a step on a CPU. The trainer's batches only pace the loop (random data)."""
PAIRS = 48
"""Preference pairs the DPO stage renders."""


def curated_keys(cache_dir: Path, eval_fraction: float) -> list[str]:
    """The demo's curated set: the cached text-to-image samples (not held out) whose blur score
    (Laplacian variance: sharpness) is at least the median, in key order."""
    from mmdit.cache import OK, LatentCache, read_manifest
    from mmdit.dataservice.plan import held_out

    cached = set()
    cache = LatentCache(cache_dir)
    for fp in cache.fingerprints():
        cached.update(cache.keys(fp))
    rows = [r for r in read_manifest(cache_dir / "manifest").to_pylist()
            if r["status"] == OK and r["task"] == "t2i" and r["key"] in cached and not held_out(r["key"], eval_fraction)]
    if not rows:
        raise SystemExit(f"mmdit demo --stage sft: no cached text-to-image sample in {cache_dir}")
    blur = sorted(r["blur"] for r in rows)
    median = blur[len(blur) // 2]
    return sorted(r["key"] for r in rows if r["blur"] >= median)


def run_post(stage: str, cfg, argv: list[str], run: Path, stages, table, pretrained: Path) -> dict:
    """Run the `stage` (sft | dpo | grpo) post-training from `pretrained` (a checkpoint's model/ dir);
    returns the stage's summary (also printed)."""
    from mmdit.launch.demo import mmdit

    out = run / stage
    out.mkdir(parents=True, exist_ok=True)
    given = {a.split("=", 1)[0] for a in argv}
    own = {**POST, **{"dpo": DPO, "grpo": GRPO}.get(stage, {})}
    # the pretrain demo's parallelism and held-out split (never trained on), unless overridden
    own |= {"launch.nproc": str(cfg.launch.nproc), "parallel.tp": str(cfg.parallel.tp),
            "data.eval_fraction": str(cfg.data.eval_fraction)}
    common = [f"encoders.dir={cfg.encoders.dir}", f"cache.dir={cfg.cache.dir}", *argv,
              *[f"{k}={v}" for k, v in own.items() if k not in given]]
    if stage == "grpo":
        return run_grpo(cfg, common, out, stages, table, pretrained)
    if stage == "sft":
        curated = out / "curated.txt"
        keys = curated_keys(Path(cfg.cache.dir), cfg.data.eval_fraction)
        curated.write_text("# mmdit demo --stage sft: the sharper half of the cached text-to-image samples\n"
                           + "\n".join(keys) + "\n")
        print(f"   curated list: {len(keys)} samples ({curated})", flush=True)
        data = ["data=sft", f"data.filters.curated_list={curated}", "train=sft"]
    else:
        shards = run / "pair_shards"
        if not list(shards.glob("*.tar")):
            stages.run("synth-pairs", mmdit("synth", str(shards), "pairs=true", f"num_samples={PAIRS}",
                                            *[a for a in argv if a.startswith("synth.")]))
        report = json.loads(stages.run("produce-pairs", mmdit("produce", f"data.shards={shards}/*.tar",
                                                              f"run.dir={out}", *common)))
        print(f"   {report['accepted']} of {report['seen']} pairs accepted, {report['encoded']} encoded, "
              f"{report['cache_hits']} already cached", flush=True)
        data = ["data=dpo"]
    dp = cfg.launch.nproc // cfg.parallel.tp
    service = [f"service.dp_size={dp}"]
    print(f"== serve ({stage})", flush=True)
    serve = ServeProcess([*common, *data, f"run.dir={out / 'service'}", "service.producers=2", *service])
    table.add(f"serve-{stage}", f"demo_serve_{stage}", serve.proc.pid)
    try:
        stages.run(f"train-{stage}", mmdit("train", *common, *data, f"run.dir={out}", f"checkpoint.init_from={pretrained}",
                                           "train.data_source=service", *service, *serve.client_overrides))
    finally:
        serve.stop(timeout=2 * cfg.service.shutdown_timeout_s)
        table.set_returncode(serve.proc.pid, serve.proc.returncode)
    return _summary(stage, out)


def run_grpo(cfg, common: list[str], out: Path, stages, table, pretrained: Path) -> dict:
    """The GRPO stage: a data service, one reward worker on it, the trainer scoring there; the
    worker, then the service, stopped whatever happens (the worker leaves while the group lives)."""
    from mmdit.launch.demo import _stop, mmdit

    dp = cfg.launch.nproc // cfg.parallel.tp
    service = [f"service.dp_size={dp}"]
    print("== serve (grpo)", flush=True)
    serve = ServeProcess([*common, f"run.dir={out / 'service'}", "service.producers=0", "eval.evaluator=false",
                          *service])
    table.add("serve-grpo", "demo_serve_grpo", serve.proc.pid)
    worker = None
    try:
        log_path = stages.logs / "reward-worker.log"
        worker = _start_reward_worker(common, serve.client_overrides, log_path, table)
        stages.run("train-grpo", mmdit("train", *common, f"run.dir={out}", f"checkpoint.init_from={pretrained}",
                                       *service, *serve.client_overrides), while_running=WorkerWatch(worker, log_path))
    finally:
        if worker is not None:
            _stop(worker, cfg.service.shutdown_timeout_s)
            table.set_returncode(worker.pid, worker.returncode)
        serve.stop(timeout=2 * cfg.service.shutdown_timeout_s)
        table.set_returncode(serve.proc.pid, serve.proc.returncode)
    return _grpo_summary(out)


def _start_reward_worker(common: list[str], client: list[str], log_path: Path, table) -> subprocess.Popen:
    """`mmdit reward-worker` on the service, in a process group of its own (as the stages), its
    log in `log_path`."""
    from mmdit.launch.demo import mmdit

    print("== reward-worker", flush=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(mmdit("reward-worker", *common, *client), start_new_session=True, env=child_env(),
                                stdout=log, stderr=log)
    table.add("reward-worker", "demo_reward_worker", proc.pid)
    return proc


class WorkerWatch:
    """Called while the trainer runs (Stages.run's `while_running`): a reward worker that exited
    stops the stage (SIGTERM to the trainer, which checkpoints once its waiting chunk gives up),
    where the trainer would go on waiting out service.join_timeout_s for each chunk and train on
    NaN rewards. The trainer starts beside the worker's start-up: its chunks wait for
    the worker to join."""

    def __init__(self, worker: subprocess.Popen, log_path: Path):
        self.worker, self.log_path = worker, log_path

    def __call__(self) -> None:
        if self.worker.poll() is not None:
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise SystemExit(f"mmdit demo: the reward worker exited with {self.worker.returncode} "
                             f"({self.log_path}):\n  " + "\n  ".join(tail))


def _grpo_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    lineage = json.loads((out / "lineage.json").read_text())
    records = [r for r in read_jsonl(out / "metrics.jsonl") if not r.get("eval")]
    lines = [f"== grpo done: {summary['steps_run']} steps on TP={summary['tp']} x DP={summary['dp']}, rewards from "
             f"one reward worker on the data service",
             f"   from {lineage['source']} (step {lineage['step']}, fingerprint {lineage['fingerprint'][:12]})"]
    for r in records:
        o = r["objective"]
        lines.append(f"   step {r['step']}: reward mean {o['reward_mean']:.4f} (std {o['reward_std']:.4f}, "
                     f"{o['images']:.0f} images), rollout {o['rollout_s']:.1f} s, "
                     f"reward wait {o['reward_wait_s']:.1f} s, update {o['update_s']:.1f} s")
    if records and all(r["objective"]["reward_std"] == 0 for r in records):
        lines.append("   every image of a group scored the same (the tiny model renders no readable text for OCR): "
                     "no advantage, no update; train.grpo.reward=latent_target shows one")
    lines.append(f"   run {out}: metrics {out / 'metrics.jsonl'}, checkpoints {out / 'checkpoints'}, "
                 f"reward worker log {out.parent / 'logs' / 'reward-worker.log'}")
    print("\n".join(lines), flush=True)
    summary["reward_mean"] = [r["objective"]["reward_mean"] for r in records]
    return summary


def _summary(stage: str, out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    lineage = json.loads((out / "lineage.json").read_text())
    records = [r for r in read_jsonl(out / "metrics.jsonl") if not r.get("eval")]
    lines = [f"== {stage} done: {summary['steps_run']} steps on TP={summary['tp']} x DP={summary['dp']}, loss "
             f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}",
             f"   from {lineage['source']} (step {lineage['step']}, fingerprint {lineage['fingerprint'][:12]}); "
             f"lineage in {out / 'lineage.json'} and every checkpoint's trainer.json"]
    drawn = {k for r in read_jsonl(out / "samples.jsonl") for k in r["keys"]}
    if stage == "sft":
        from mmdit.cache.manifest import read_key_list

        off = drawn - read_key_list(out / "curated.txt")
        lines.append(f"   {len(drawn)} distinct samples drawn, {len(off)} of them off the curated list")
        summary["off_curated_list"] = len(off)
    if stage == "dpo" and records:
        half = records[len(records) // 2:]
        mean = {k: sum(r["objective"][k] for r in half) / len(half) for k in ("reward_margin", "preference_accuracy")}
        first = records[0]["objective"]
        lines.append(f"   reward margin {first['reward_margin']:.3f} -> {mean['reward_margin']:.3f}, preference "
                     f"accuracy {first['preference_accuracy']:.2f} -> {mean['preference_accuracy']:.2f} (second half's "
                     "mean, training pairs)")
        summary["objective_second_half"] = mean
    lines.append(f"   checkpoints {out / 'checkpoints'}, metrics {out / 'metrics.jsonl'}")
    print("\n".join(lines), flush=True)
    return summary
