"""EMA weights (train.ema_decay, parallel/ema.py): the average by hand, exact resume, TP=2 -> TP=1
resharding, and `weights=ema` in `mmdit sample`, the trainer's evaluations and `convert to-diffusers`.

One TP=2 run (real processes) from known weights, checkpointed every step; the rest runs in this
process at TP=1 from copies of its run directory.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ema_workers import train_rank
from model_workers import random_full_state_dict
from safetensors import safe_open

from mmdit.config.loader import load_config
from mmdit.consumer.checkpoint import checkpoint_dir
from mmdit.launch.convert import meta_partition_dims
from mmdit.model.checkpoint import load_full_state_dict_from, save_full_state_dict
from mmdit.model.qkv import to_diffusers
from mmdit.parallel.spawn import spawn
from mmdit.parallel.state import destroy_parallel

TINY = load_config([]).model
DECAY = 0.5


def overrides(run, base, *more) -> list[str]:
    return [f"run.dir={run}", f"checkpoint.init_from={base}", "train.micro_batch_size=2", "train.random_height=32",
            "train.random_width=32", "train.tensorboard=false", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
            "optimizer.lr_schedule=constant", f"train.ema_decay={DECAY}", "checkpoint.every=1", "checkpoint.keep=10",
            *more]


def train_here(*args: str) -> list[dict]:
    from mmdit.consumer.trainer import Trainer

    cfg = load_config(list(args))
    try:
        Trainer(cfg).run()
    finally:
        destroy_parallel()
    return [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]


def ema_by_hand(ckpt) -> dict[str, torch.Tensor]:
    """The EMA of a checkpoint written at DP=1, joined over its TP files here, in diffusers names."""
    index = json.loads((ckpt / "ema" / "ema.json").read_text())
    assert index["dp"] == 1 and index["decay"] == DECAY
    files = [safe_open(str(ckpt / "ema" / f"tp{t:02d}-dp00.safetensors"), "pt") for t in range(index["tp"])]
    full = {}
    for name, p in index["params"].items():
        local = list(p["shape"])
        if p["dim"] is not None:
            local[p["dim"]] //= index["tp"]
        parts = [f.get_tensor(f"ema/{name}").view(local) for f in files]
        full[name] = parts[0] if p["dim"] is None else torch.cat(parts, dim=p["dim"])
    return dict(to_diffusers(full.items(), TINY.attention_head_dim))


def resumed_copy(src, dst, step: int):
    """A copy of run `src` as an interrupted run left it: its checkpoints up to `step`."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    return dst


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the spawned ranks run: on a loaded shared machine, spinning worker
    threads only slow a tiny model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """Known initial weights, and 3 steps at TP=2 from them (async saves, one checkpoint a step)."""
    root = tmp_path_factory.mktemp("ema")
    state = random_full_state_dict(TINY, seed=3)
    destroy_parallel()
    save_full_state_dict(state, TINY, meta_partition_dims(TINY), root / "base", tp=1)
    destroy_parallel()
    spawn(train_rank, 2, overrides(root / "tp2", root / "base", "train.steps=3", "parallel.tp=2"))
    return root, state


@pytest.mark.slow
def test_the_ema_is_the_moving_average_of_the_weights_by_hand(tp2):
    root, w0 = tp2
    expected = {name: t.double() for name, t in w0.items()}
    for step in (1, 2, 3):
        ckpt = checkpoint_dir(root / "tp2", step)
        weights = load_full_state_dict_from(ckpt / "model")
        ema = ema_by_hand(ckpt)
        frozen = set(weights) - set(ema)  # the last block's text-stream outputs feed nothing: never trained
        assert set(ema) < set(weights) and all(torch.equal(weights[n], w0[n]) for n in frozen)
        for name in ema:
            w = weights[name]
            expected[name] = DECAY * expected[name] + (1 - DECAY) * w.double()
            assert torch.allclose(ema[name].double(), expected[name], rtol=0, atol=1e-6), (step, name)
    lag = max((ema[n] - weights[n]).abs().max().item() for n in ema)
    assert lag > 1e-3, "the average must lag the trained weights"


@pytest.mark.slow
def test_resume_at_tp1_from_tp2_continues_the_ema_exactly(tp2, tmp_path):
    root, _ = tp2
    run = resumed_copy(root / "tp2", tmp_path / "tp1", 2)
    train_here(*overrides(run, root / "base", "train.steps=3"))
    before = ema_by_hand(checkpoint_dir(run, 2))  # written at TP=2
    weights = load_full_state_dict_from(checkpoint_dir(run, 3) / "model")
    after = ema_by_hand(checkpoint_dir(run, 3))  # written at TP=1 after the resharded load and one update
    assert json.loads((checkpoint_dir(run, 3) / "ema" / "ema.json").read_text())["tp"] == 1
    assert set(after) == set(before)
    for name in after:
        assert torch.equal(after[name], torch.lerp(before[name], weights[name], 1 - DECAY)), name
    assert any(not torch.equal(after[n], before[n]) for n in after)


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_ema_evaluations_agree(tp2, tmp_path):
    """Resumed at step 2, the EMA of step 3 is the uninterrupted run's; the trainer's evaluation of
    the EMA leaves the trained weights as they were and gives what the evaluator gives."""
    root, _ = tp2
    evals = ["eval.every=3", "eval.max_samples=2", "eval.sigmas=2"]
    straight = train_here(*overrides(tmp_path / "straight", root / "base", "train.steps=3", *evals, "eval.weights=ema"))
    run = resumed_copy(tmp_path / "straight", tmp_path / "resumed", 2)
    resumed = train_here(*overrides(run, root / "base", "train.steps=3", *evals))  # raw weights evaluated
    ema, ema_resumed = ema_by_hand(checkpoint_dir(tmp_path / "straight", 3)), ema_by_hand(checkpoint_dir(run, 3))
    assert all(torch.equal(ema[n], ema_resumed[n]) for n in ema)
    weights = load_full_state_dict_from(checkpoint_dir(tmp_path / "straight", 3) / "model")
    weights_resumed = load_full_state_dict_from(checkpoint_dir(run, 3) / "model")
    assert all(torch.equal(weights[n], weights_resumed[n]) for n in weights)  # EMA swapped in, and back out
    eval_ema = [r for r in straight if r.get("eval")][-1]
    eval_raw = [r for r in resumed if r.get("eval")][-1]
    assert eval_ema["step"] == eval_raw["step"] == 3 and eval_ema["eval_loss"] != eval_raw["eval_loss"]

    from mmdit.consumer.evaluator import RunEvaluator

    evaluator = RunEvaluator(load_config(overrides(tmp_path / "straight", root / "base", *evals, "eval.weights=ema")),
                             tmp_path / "straight")
    try:
        [record] = evaluator.evaluate("step_00000003", ["loss"])  # the evaluator process's way: from the files
    finally:
        evaluator.close()
        destroy_parallel()
    assert record["eval_loss"] == eval_ema["eval_loss"]


@pytest.mark.slow
def test_sample_and_convert_with_ema_weights(tp2, tiny_encoders_dir, tmp_path):
    from PIL import Image

    from mmdit.consumer.sample import SampleConfig, load_sampler
    from mmdit.launch.cli import main
    from mmdit.launch.convert import to_diffusers
    from mmdit.model.diffusers_io import read_diffusers
    from mmdit.model.qkv import diffusers_names, fuse

    root, _ = tp2
    ckpt = checkpoint_dir(root / "tp2", 3)  # written at TP=2, sampled at TP=1
    settings = ["width=32", "height=32", "steps=3", "true_cfg_scale=1", "prompt=a red sign"]
    try:
        assert main(["sample", str(ckpt), f"encoders={tiny_encoders_dir}", "weights=ema", f"out={tmp_path / 'ema'}",
                     *settings]) == 0
        ema_image = np.asarray(Image.open(tmp_path / "ema" / "00.png"))
        sampler = load_sampler(ckpt, tiny_encoders_dir)  # raw weights, then the EMA put in by hand
        cfg = SampleConfig(width=32, height=32, steps=3, true_cfg_scale=1)
        raw_image = np.asarray(sampler.generate("a red sign", cfg))
        ema = ema_by_hand(ckpt)
        with torch.no_grad():
            for name, p in sampler.model.named_parameters():
                parts = diffusers_names(name)
                if parts[0] not in ema:  # never trained: the EMA leaves it
                    continue
                p.copy_(ema[name] if len(parts) == 1 else fuse([ema[n] for n in parts], TINY.attention_head_dim))
        by_hand_image = np.asarray(sampler.generate("a red sign", cfg))
    finally:
        destroy_parallel()
    assert np.array_equal(ema_image, by_hand_image)
    assert not np.array_equal(ema_image, raw_image)

    to_diffusers(str(ckpt), str(tmp_path / "diffusers"), weights="ema")
    _, exported = read_diffusers(tmp_path / "diffusers")
    raw = load_full_state_dict_from(ckpt / "model")
    assert set(exported) == set(raw) and all(torch.equal(exported[n], ema.get(n, raw[n])) for n in raw)
