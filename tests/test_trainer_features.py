"""What a practitioner expects of the trainer: schedules, accumulation, weight-decay groups,
held-out evaluation, and sampling (mmdit sample; an exported checkpoint in diffusers' pipeline)."""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch

from mmdit.consumer.schedule import lr_at

# ----------------------------------------------------------------------------- in process


def test_schedules_warm_up_then_decay_to_min_lr():
    lr = lambda step, kind: lr_at(step, 1.0, 0.1, 10, 110, kind)  # noqa: E731
    assert [lr(s, "cosine") for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warmup to the peak
    assert lr(10, "cosine") == pytest.approx(1.0)
    assert lr(60, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way: 0.55
    assert lr(110, "cosine") == pytest.approx(0.1) and lr(500, "cosine") == pytest.approx(0.1)
    assert lr(60, "linear") == pytest.approx(0.55) and lr(35, "linear") == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr(10, "constant") == lr(100, "constant") == 1.0
    cosine = [lr(s, "cosine") for s in range(10, 111)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))  # never rises after the peak


def test_weight_decay_only_on_matrices():
    from mmdit.config.loader import load_config
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    cfg = load_config(["optimizer.weight_decay=0.1"])
    try:
        built = parallelize(cfg.model, cfg.parallel, optimizer=cfg.optimizer, seed=0)
        model, backend = built.model, built.backend
        groups = backend.optimizer.param_groups
        decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        assert decay and no_decay and not decay & no_decay
        assert all(names[i].endswith("weight") and dict(model.named_parameters())[names[i]].dim() == 2 for i in decay)
        assert any(names[i].endswith("bias") for i in no_decay) and any("norm" in names[i] for i in no_decay)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert decay | no_decay == trainable
    finally:
        destroy_parallel()


def test_accumulation_must_divide_the_global_batch():
    from mmdit.config import ConfigError
    from mmdit.config.loader import load_config

    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size x DP = 2 x 2"):
        load_config(["launch.nproc=2", "train.micro_batch_size=2", "train.global_batch_size=6"])
    assert load_config(["launch.nproc=2", "train.micro_batch_size=2", "train.global_batch_size=8"])


# ----------------------------------------------------------------------------- real processes

BASE = ["train.random_height=64", "train.random_width=64", "optimizer.lr=1e-3", "optimizer.warmup_steps=1",
        "train.random_pool_size=64", "optimizer.lr_schedule=constant"]


def train(run_dir: Path, *overrides: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run_dir}", *BASE,
                           *overrides], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def concurrently(*calls) -> list:
    """Run independent CLI runs at once (each mostly starts up, which two cores overlap); their
    results in order, the first failure raised as is."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def records(run_dir: Path, evals: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if bool(r.get("eval")) == evals]


def weights(run_dir: Path) -> dict:
    from mmdit.model.checkpoint import load_full_state_dict_from

    latest = (run_dir / "checkpoints" / "latest").read_text()
    return load_full_state_dict_from(run_dir / "checkpoints" / latest / "model")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_accumulation_equals_one_big_batch_at_any_split(tmp_path):
    """4 samples per optimizer step: one micro-batch of 4, four of 1, and two DP ranks x two
    micro-batches of 1 give the same losses and the same weights."""
    concurrently(partial(train, tmp_path / "big", "train.steps=3", "train.micro_batch_size=4"),
                 partial(train, tmp_path / "accum", "train.steps=3", "train.micro_batch_size=1",
                         "train.global_batch_size=4"),
                 partial(train, tmp_path / "dp_accum", "train.steps=3", "train.micro_batch_size=1",
                         "train.global_batch_size=4", "launch.nproc=2"))
    reference, big = records(tmp_path / "big"), weights(tmp_path / "big")
    for name in ("accum", "dp_accum"):
        rows = records(tmp_path / name)
        assert [r["global_batch_size"] for r in rows] == [4, 4, 4]
        assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], abs=1e-5), name
        # the same gradient (a wrong scale would be off by the accumulation factor)
        assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4), name
        for key, value in weights(tmp_path / name).items():  # Adam turns rounding into at most ~lr/10
            torch.testing.assert_close(value, big[key], rtol=0, atol=3e-4, msg=f"{name}: {key}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluation_is_deterministic_across_runs_and_layouts(tmp_path):
    common = ["train.steps=2", "eval.every=2", "eval.max_samples=6", "eval.sigmas=4",
              "train.micro_batch_size=2"]
    concurrently(partial(train, tmp_path / "a", *common), partial(train, tmp_path / "b", *common),
                 partial(train, tmp_path / "tp2", *common, "launch.nproc=2", "parallel.tp=2"),
                 partial(train, tmp_path / "dp2", *common, "launch.nproc=2", "train.micro_batch_size=1"))
    (ra,), (rb,) = records(tmp_path / "a", True), records(tmp_path / "b", True)
    assert ra == rb and ra["eval_samples"] == 6 and len(ra["eval_loss_per_sigma"]) == 4
    for name in ("tp2", "dp2"):
        (r,) = records(tmp_path / name, True)
        assert r["eval_loss_per_sigma"] == pytest.approx(ra["eval_loss_per_sigma"], abs=1e-5), name


STOP_BEFORE_THE_FIRST_STEP_ENDS = """
import json, sys
from mmdit.consumer.trainer import Trainer
from mmdit.config.loader import load_config
trainer = Trainer(load_config(sys.argv[1:]))
trainer.stop_requested = True  # as SIGTERM during the first step would
print(json.dumps(trainer.run()))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopping_trainer_checkpoints_without_evaluating_first(tmp_path):
    common = [*BASE, "train.steps=5", "eval.every=1", "eval.max_samples=2", "checkpoint.every=100"]
    run = tmp_path / "stopped"
    done = subprocess.run([sys.executable, "-c", STOP_BEFORE_THE_FIRST_STEP_ENDS, f"run.dir={run}", *common],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["stopped_early"]
    assert [r["step"] for r in records(run)] == [1] and records(run, True) == []
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_encoders_dir):
    run = tmp_path_factory.mktemp("trained")
    train(run, "train.steps=2", "train.micro_batch_size=1", f"encoders.dir={tiny_encoders_dir}", *PREVIEWS)
    return run


PREVIEWS = ["eval.sample_every=2", "eval.sample_size=64", "eval.sample_steps=3"]


def sample(*args) -> subprocess.CompletedProcess:
    # one thread, as `train` runs: the images are compared byte for byte, and a CPU kernel's
    # float reductions may split differently over another thread count
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "sample", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sample_writes_deterministic_pngs_of_the_requested_size(trained, tmp_path):
    from PIL import Image

    prompts = ['prompt=a shop sign that reads "OPEN"', "prompt=一张写着“欢迎光临”的海报"]
    args = [str(trained), *prompts, "width=96", "height=64", "steps=3", "seed=7"]
    runs = concurrently(partial(sample, *args, f"out={tmp_path / 'a'}"), partial(sample, *args, f"out={tmp_path / 'b'}"),
                        partial(sample, *args[:-1], "seed=8", f"out={tmp_path / 'c'}"))
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    for name in ("00.png", "01.png"):
        img = Image.open(tmp_path / "a" / name)
        assert img.size == (96, 64) and img.mode == "RGB"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * 96, 64)
    edit = sample(str(trained), "prompt=make the sign blue", f"image={tmp_path / 'a' / '00.png'}", "width=96",
                  "height=64", "steps=2", f"out={tmp_path / 'edit'}")
    assert edit.returncode == 0, edit.stderr[-3000:]
    assert Image.open(tmp_path / "edit" / "00.png").size == (96, 64)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_samples_the_fixed_prompts_as_mmdit_sample_does(trained, tiny_encoders_dir, tmp_path):
    """run.dir/samples/step_N/ holds the prompts sampled at step N: the very images `mmdit sample`
    makes from that step's checkpoint; with TP=2 both ranks sample together and agree."""
    import numpy as np
    from PIL import Image

    from mmdit.config.train import PREVIEW_PROMPTS

    step = trained / "samples" / "step_00000002"
    assert json.loads((step / "prompts.json").read_text()) == list(PREVIEW_PROMPTS)
    assert Image.open(step / "grid.png").size == (2 * 64, 2 * 64)
    tp2 = tmp_path / "tp2"
    *again, _ = concurrently(
        *[partial(sample, str(trained), f"prompt={prompt}", "width=64", "height=64", "steps=3", f"seed={i}",
                  f"out={tmp_path / str(i)}") for i, prompt in enumerate(PREVIEW_PROMPTS)],
        partial(train, tp2, "train.steps=2", "train.micro_batch_size=1", f"encoders.dir={tiny_encoders_dir}",
                *PREVIEWS, "launch.nproc=2", "parallel.tp=2"))
    for i, prompt in enumerate(PREVIEW_PROMPTS):
        assert again[i].returncode == 0, again[i].stderr[-3000:]
        assert (tmp_path / str(i) / "00.png").read_bytes() == (step / f"{i:02d}.png").read_bytes(), prompt
    for i in range(len(PREVIEW_PROMPTS)):
        a = np.asarray(Image.open(step / f"{i:02d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tp2 / "samples" / "step_00000002" / f"{i:02d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 2  # the same model split over two ranks: rounding only


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_exported_checkpoint_generates_in_the_diffusers_pipeline(trained, tiny_encoders_dir, tmp_path):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from mmdit.model.flow import QWEN_IMAGE_SCHEDULER_CONFIG

    latest = (trained / "checkpoints" / "latest").read_text()
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "convert", "to-diffusers",
                           str(trained / "checkpoints" / latest / "model"), str(tmp_path / "export")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
        vae=AutoencoderKLQwenImage.from_pretrained(tiny_encoders_dir, subfolder="vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_encoders_dir, subfolder="text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(tiny_encoders_dir, subfolder="tokenizer"),
        transformer=QwenImageTransformer2DModel.from_pretrained(tmp_path / "export"))
    image = pipe("a red sign", height=64, width=96, num_inference_steps=2, output_type="pil",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (96, 64)


# ----------------------------------------------------------------------------- tasks and curriculum


def test_the_loss_covers_target_tokens_only():
    """Edit and reconstruction batches carry condition tokens; whatever the model says about
    them never enters the loss."""
    from mmdit.config.parallel import ParallelConfig
    from mmdit.config.train import TrainConfig
    from mmdit.consumer.objectives import FlowObjective
    from mmdit.parallel.parallelize import resolve

    class Model:
        def __init__(self, cond_value):
            self.cond_value = cond_value
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def __call__(self, tokens, txt, mask, sigmas, shapes):
            out = torch.zeros_like(tokens) + self.weight
            n = shapes[0][1] * shapes[0][2]
            out[:, n:] = self.cond_value  # the condition image's tokens
            return out

    flow = FlowObjective(TrainConfig(), seed=0, plan=resolve(ParallelConfig(), device="cpu"))
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 16, 8, 8, generator=g), "cond_latents": torch.randn(2, 16, 8, 8, generator=g),
             "prompt_embeds": torch.randn(2, 5, 64, generator=g), "prompt_mask": torch.ones(2, 5, dtype=torch.bool)}
    losses = [float(flow.loss(Model(v), batch, step=0, first_index=0)[0]) for v in (0.0, 1e6)]
    assert losses[0] == losses[1] and math.isfinite(losses[0])


def test_a_curriculum_stage_change_is_planned_at_its_step_and_replayed_exactly():
    from mmdit.config.service import ServiceConfig
    from mmdit.dataservice.coordinator import Coordinator
    from mmdit.dataservice.plan import Cursor, DataVersion, Planner, SampleRef, Selection

    refs = [SampleRef(f"k{i:03d}", (256, 256) if stage == 256 else (640, 640), "t2i", stage=stage)
            for stage in (256, 640) for i in range(40)]
    sel = Selection(refs)
    history = [DataVersion(0, 0, 0, stage=256)]

    def coordinator():
        return Coordinator(sel, ServiceConfig(plan_ahead=6), 3, 2, 2, [DataVersion(0, 0, 0, stage=256)],
                           stages={256: "fp-b256", 640: "fp-b640"},
                           curriculum=[{"step": 5, "base_resolution": 640}], accumulation=2)

    c = coordinator()
    c.register_consumer("t0", 1, 0, 2, 2, None, None)
    c.register_consumer("t1", 2, 1, 2, 2, None, None)
    for seq in range(12):  # consume (ack) everything planned, so planning moves on
        c._plan_window(at_least=seq + 1)
        c.ack("t0", 0, c.gen, [seq])
        c.ack("t1", 1, c.gen, [seq])
    planned = Planner(c.spec, sel, list(c.history))
    batches = [planned.next()[1] for _ in range(14)]
    assert [b.stage for b in batches[:8]] == [256] * 8  # steps 1-4: 2 global batches each
    assert [b.stage for b in batches[8:]] == [640] * 6  # from step 5 on
    (v1,) = [v for v in c.history if v.version == 1]
    assert (v1.from_step, v1.stage, v1.why) == (5, 640, "curriculum: step 5")
    # a new coordinator (a restarted service) and a trainer resuming at step 3 with its history
    # replay the same plan; the curriculum is not applied twice
    again = coordinator()
    cursor = Cursor(4, batches[3].epoch, batches[3].index + 1)
    again.register_consumer("t0b", 1, 0, 2, 2, cursor.to_dict(), [v.to_dict() for v in history])
    again._plan_window(at_least=14)
    assert [again.entries[s].batch for s in range(4, 14)] == batches[4:14]
    assert [v.version for v in again.history] == [0, 1]


def test_text_padding_is_cut_to_the_longest_prompt_and_no_mask_is_passed_when_none_is_left():
    from mmdit.consumer.batch import StepInputs

    def batch(lengths, width=9):
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        return {"latents": torch.zeros(len(lengths), 16, 8, 8), "prompt_mask": mask,
                "prompt_embeds": torch.randn(len(lengths), width, 64) * mask[..., None]}

    padded = StepInputs.from_batch(batch([3, 5]), "cpu", torch.float32)
    assert padded.txt.shape == (2, 5, 64) and padded.txt_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    full = StepInputs.from_batch(batch([5, 5]), "cpu", torch.float32)
    assert full.txt.shape == (2, 5, 64) and full.txt_mask is None  # the flash kernel's case


def test_megatron_resume_gives_every_adam_state_its_own_step():
    """What megatron's DistributedOptimizer does on resume without TE/apex, on a torch Adam: its
    load_state_dict puts one shared step tensor in every state, and load_parameter_state copies
    every state key from a file without "step". With the steps set aside: no KeyError, and
    afterwards each state has its own step, which advances by one per iteration."""
    from mmdit.parallel.backend import steps_set_aside

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = torch.optim.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    shared = torch.tensor(7.0)
    for state in opt.state.values():  # megatron's load_state_dict for torch Adam
        state["step"] = shared
    saved = {id(p): {"param": p.detach().clone(), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)} for p in params}

    def load_parameter_state():  # megatron's _set_main_param_and_optimizer_states
        for p in params:
            dst = {"param": p, **opt.state[p]}
            for key in dst:
                dst[key].data.copy_(saved[id(p)][key])

    with pytest.raises(KeyError, match="step"):
        load_parameter_state()
    with steps_set_aside([opt]):
        load_parameter_state()
    steps = [opt.state[p]["step"] for p in params]
    assert len({id(s) for s in steps}) == 4 and all(float(s) == 7.0 for s in steps)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 8.0 for p in params)  # not 7 + 4
