"""Five minutes on a fresh GPU: does the GPU path train, resume and run fast? (bench/gpu_smoke.sh)

Checks, each failing loudly (exit 1, the failed check named):
1. the tiny model trains with the megatron backend (DistributedDataParallel +
   DistributedOptimizer) in bf16, checkpoints, and resumes; after the resume every Adam state has
   its own step counter, equal to the steps taken;
2. step 1's loss and gradient norm agree between the megatron backend and the torch backend on
   the same data (bf16 vs fp32: within a few percent);
3. the 20B-width slice (4 blocks, hidden 3072, 1328x1328, TP=1) times one bf16 training step with
   recompute `none` and the cheapest policy that fits, and reports TFLOP/s and MFU
   (model/flops.py); the target is MFU >= 0.45 of the dense bf16 peak;
4. the slice with padded prompts under each attention kernel (sdpa masked, varlen, te).

    python bench/gpu_smoke.py --out DIR        (DIR/gpu_smoke.json, DIR/slice_*.json)
    python bench/gpu_smoke.py --dry-run        (on any machine: the plan, no GPU needed)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = ["train.random_height=256", "train.random_width=256", "train.micro_batch_size=2", "optimizer.lr=1e-3",
         "optimizer.warmup_steps=1", "optimizer.lr_schedule=constant", "train.tensorboard=false"]


class CheckFailed(AssertionError):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def mmdit_train(run: Path, *overrides: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run}", *TRAIN, *overrides],
                          capture_output=True, text=True, timeout=900)
    check(done.returncode == 0, f"mmdit train {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adam_steps(run: Path) -> list[float]:
    """Every Adam state's step after resuming the run's latest checkpoint, in this process."""
    import torch

    from mmdit.config.loader import load_config
    from mmdit.consumer.trainer import Trainer
    from mmdit.parallel.state import destroy_parallel

    trainer = Trainer(load_config([f"run.dir={run}", *TRAIN, "parallel.backend=megatron", "train.dtype=bf16"]))
    try:
        plan = trainer.plan  # parallel/parallelize.py: what the megatron run was built with
        check(plan.backend == "megatron" and plan.params_dtype == torch.bfloat16 and not plan.autocast,
              f"megatron bf16 run planned as: {plan.describe()}")
        chained = getattr(trainer.backend.optimizer, "chained_optimizers", [trainer.backend.optimizer])
        states = [s for o in chained for s in getattr(o, "optimizer", o).state.values()]
        steps = [s["step"] for s in states if "step" in s]
        check(len({id(s) for s in steps}) == len(steps), "Adam states share one step tensor after resume")
        return [float(s) for s in steps]
    finally:
        destroy_parallel()


def backend_checks(tmp: Path) -> dict:
    mega = mmdit_train(tmp / "megatron", "train.steps=4", "checkpoint.every=2", "parallel.backend=megatron",
                       "train.dtype=bf16")
    check(all(r["step"] == i + 1 for i, r in enumerate(mega)), "megatron run logged steps out of order")
    resumed = mmdit_train(tmp / "megatron", "train.steps=6", "parallel.backend=megatron", "train.dtype=bf16")
    check([r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6], "resume did not continue at step 5")
    steps = adam_steps(tmp / "megatron")
    check(not steps or set(steps) == {6.0}, f"Adam step counters after resume: {sorted(set(steps))} (want 6)")
    torch_run = mmdit_train(tmp / "torch", "train.steps=1", "parallel.backend=torch", "train.dtype=fp32")
    loss_gap = abs(mega[0]["loss"] - torch_run[0]["loss"]) / abs(torch_run[0]["loss"])
    norm_gap = abs(mega[0]["grad_norm"] - torch_run[0]["grad_norm"]) / abs(torch_run[0]["grad_norm"])
    check(loss_gap < 0.05 and norm_gap < 0.1, f"step 1 differs between backends: loss {loss_gap:.3f}, "
                                              f"grad norm {norm_gap:.3f} (relative)")
    return {"megatron_step1": mega[0], "torch_step1": torch_run[0], "loss_relative_gap": loss_gap,
            "grad_norm_relative_gap": norm_gap, "adam_steps_after_resume": sorted(set(steps)),
            "megatron_step_time_s": [r["step_time_s"] for r in resumed]}


def slice_checks(out: Path) -> dict:
    results = {}
    for policies in ("none", "elementwise,attention,mlp,every_k,full"):
        target = out / f"slice_{policies.split(',')[0]}.json"
        done = subprocess.run([sys.executable, str(HERE / "recompute.py"), "--slice", "--device", "cuda",
                               "--dtype", "bf16", "--policies", policies, "--out", str(target)],
                              capture_output=True, text=True, timeout=900)
        if done.returncode and policies == "none":  # out of memory without recompute: the next try tells
            results["none"] = {"error": done.stderr[-500:]}
            continue
        check(done.returncode == 0, f"slice benchmark ({policies}) failed:\n{done.stderr[-3000:]}")
        results[policies] = json.loads(target.read_text())
    return results


def attention_checks(out: Path) -> dict:
    """The slice with padded prompts (a quarter of the text padded on the second sample) under each
    attention kernel; the masked SDPA path against the packed flash ones."""
    from mmdit.model.layers import transformer_engine_available

    results = {}
    for kernel in ("sdpa", "varlen", *(["te"] if transformer_engine_available() else [])):
        target = out / f"slice_attention_{kernel}.json"
        done = subprocess.run([sys.executable, str(HERE / "recompute.py"), "--slice", "--device", "cuda",
                               "--dtype", "bf16", "--policies", "elementwise", "--batch", "2", "--text-valid", "192",
                               "--attention", kernel, "--repeats", "3", "--out", str(target)],
                              capture_output=True, text=True, timeout=600)
        check(done.returncode == 0, f"attention {kernel} on padded text failed:\n{done.stderr[-3000:]}")
        results[kernel] = json.loads(target.read_text())["policies"]["elementwise"]
    return results


def sequence_parallel_checks(out: Path) -> dict:
    """TP=2 with and without sequence parallelism at the released width (two GPUs needed)."""
    import torch

    if torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {torch.cuda.device_count()}"}
    target = out / "sequence_parallel_cuda.json"
    done = subprocess.run([sys.executable, str(HERE / "sequence_parallel.py"), "--device", "cuda", "--dtype", "bf16",
                           "--tp", "2", "--layers", "2", "--heads", "24", "--head-dim", "128", "--joint-dim", "3584",
                           "--resolution", "1328", "--text-tokens", "256", "--out", str(target)],
                          capture_output=True, text=True, timeout=600)
    check(done.returncode == 0, f"sequence parallelism at TP=2 failed:\n{done.stderr[-3000:]}")
    result = json.loads(target.read_text())
    check(result["saved_ratio"] < 0.9, f"sequence parallelism saved no activation memory: {result['saved_ratio']}")
    return {key: result[key] for key in ("saved_ratio", "peak_ratio", "expected_saved_ratio_blocks_only",
                                         "step_time_ratio")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check imports, no GPU")
    args = parser.parse_args()
    out = Path(args.out)
    if args.dry_run:
        import mmdit.consumer.trainer  # noqa: F401 - the imports a GPU run needs
        import mmdit.parallel.parallelize  # noqa: F401

        print(json.dumps({"plan": ["megatron bf16 train + checkpoint + resume (Adam steps)",
                                   "step-1 loss/grad-norm vs torch backend", "slice: recompute none",
                                   "slice: cheapest recompute that fits",
                                   "slice, padded text: attention sdpa / varlen / te",
                                   "TP=2 sequence parallelism memory (with 2 GPUs)"], "out": str(out)}))
        return 0
    import torch

    check(torch.cuda.is_available(), "no CUDA device")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report["backends"] = backend_checks(Path(tmp))
        report["slice"] = slice_checks(out)
        report["attention"] = attention_checks(out)
        report["sequence_parallel"] = sequence_parallel_checks(out)
        report["passed"] = True
    except CheckFailed as e:
        report["passed"], report["failed"] = False, str(e)
        print(f"gpu smoke: FAILED: {e}", file=sys.stderr)
    report["seconds"] = round(time.time() - started, 1)
    (out / "gpu_smoke.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report)[:2000])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
