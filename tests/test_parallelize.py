"""parallel/parallelize.py: every `auto` setting resolved once into a frozen Plan, one build order;
consumer/objectives.py: the objective slot the training step computes its loss through."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mmdit.config import ConfigError
from mmdit.config.parallel import ParallelConfig

ROOT = Path(__file__).resolve().parent.parent


def _resolve(**kwargs):
    from mmdit.parallel.parallelize import resolve

    return resolve(**kwargs)


# ----------------------------------------------------------------------------- the plan


def test_the_plan_resolves_auto_settings_on_cpu():
    """The documented defaults on a CPU: torch backend, fp32, SDPA, megatron-local linears."""
    plan = _resolve(parallel=ParallelConfig(), dtype="auto", world_size=1, device="cpu")
    assert (plan.device, plan.compute_dtype, plan.params_dtype, plan.autocast) == (
        torch.device("cpu"), torch.float32, torch.float32, False)
    assert (plan.layers, plan.attention, plan.backend) == ("local", "sdpa", "torch")
    assert (plan.tp, plan.dp, plan.sequence_parallel, plan.recompute, plan.compile) == (1, 1, False, "none", False)


def test_the_plan_records_each_choice_and_its_consequences():
    # bf16 compute on the torch backend: fp32 parameters (the optimizer updates them), autocast
    plan = _resolve(parallel=ParallelConfig(tp=2, recompute="every_k", recompute_every=3), dtype="bf16",
                    world_size=4, device="cpu")
    assert (plan.compute_dtype, plan.params_dtype, plan.autocast) == (torch.bfloat16, torch.float32, True)
    assert (plan.tp, plan.dp, plan.recompute, plan.recompute_every) == (2, 2, "every_k", 3)
    # no optimizer (sampling): no backend, parameters in the compute dtype, nothing to autocast
    plan = _resolve(parallel=ParallelConfig(), dtype="bf16", world_size=1, device="cpu", training=False)
    assert (plan.backend, plan.params_dtype, plan.autocast) == (None, torch.bfloat16, False)
    # sequence parallelism is recorded as it takes effect: over a TP group of one there is none
    asked = ParallelConfig(sequence_parallel=True)
    assert not _resolve(parallel=asked, world_size=1, device="cpu").sequence_parallel
    assert _resolve(parallel=dataclasses.replace(asked, tp=2), world_size=2, device="cpu").sequence_parallel
    assert _resolve(parallel=ParallelConfig(attention="varlen"), device="cpu").attention == "varlen"


def test_the_plan_is_frozen_and_described_in_one_line():
    plan = _resolve(parallel=ParallelConfig(tp=2, sequence_parallel=True, recompute="full"), world_size=2,
                    device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers = "te"
    line = plan.describe()
    assert "\n" not in line
    for part in ("backend torch-ddp+zero1", "layers megatron-local", "attention sdpa", "dtype fp32",
                 "tp 2 (sequence parallel) x dp 1", "recompute full", "device cpu"):
        assert part in line, (part, line)


def test_bad_combinations_are_rejected_with_one_message():
    with pytest.raises(ConfigError, match=r"parallel.backend=megatron needs a GPU"):
        _resolve(parallel=ParallelConfig(backend="megatron"), device="cpu")
    with pytest.raises(ConfigError, match=r"parallel.layers=te needs Transformer Engine"):
        _resolve(parallel=ParallelConfig(layers="te"), device="cpu")
    with pytest.raises(ValueError, match=r"sequence_parallel=true needs parallel.layers=local or auto"):
        ParallelConfig(tp=2, layers="te", sequence_parallel=True)


@pytest.mark.parametrize("message", ["backend=megatron needs a GPU", "sequence_parallel=true needs parallel.layers",
                                     "parallel.layers=te needs Transformer Engine"])
def test_each_check_is_stated_once(message):
    """Each rejection lives in one place (the config or the plan), not again where the value is used."""
    sources = [p for pkg in ("config", "model", "parallel", "consumer", "bench", "launch")
               for p in (ROOT / pkg).rglob("*.py")]
    stated = [str(p.relative_to(ROOT)) for p in sources if message in p.read_text()]
    assert len(stated) == 1, stated


def test_parallelize_builds_what_the_plan_says():
    from mmdit.config.loader import load_config
    from mmdit.model.init import init_weights
    from mmdit.model.mmdit import build_mmdit
    from mmdit.parallel.backend import TorchBackend
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel, tp_group

    cfg = load_config(["parallel.recompute=full"])
    try:
        built = parallelize(cfg.model, cfg.parallel, dtype="auto", optimizer=cfg.optimizer, seed=3)
        assert isinstance(built.backend, TorchBackend) and built.backend.module is built.model
        assert built.plan.backend == "torch" and built.plan.recompute == "full"
        assert all(block.recompute_block for block in built.model.transformer_blocks)
        reference = build_mmdit(cfg.model, tp_group())
        init_weights(reference, 3)
        ours = dict(built.model.named_parameters())
        assert all(torch.equal(p, ours[n]) for n, p in reference.named_parameters())
        bare = parallelize(cfg.model, cfg.parallel, dtype="auto", seed=3)  # sampling: no optimizer
        assert bare.backend is None and bare.plan.backend is None
    finally:
        destroy_parallel()


def test_megatron_on_cpu_fails_before_anything_is_built():
    from mmdit.config.loader import load_config
    from mmdit.model import mmdit as model_module
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    cfg = load_config(["parallel.backend=megatron"])
    built = []
    original = model_module.MMDiT.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    model_module.MMDiT.__init__ = spy
    try:
        with pytest.raises(ConfigError, match="needs a GPU"):
            parallelize(cfg.model, cfg.parallel, optimizer=cfg.optimizer, seed=0, device="cpu")
        assert built == []
    finally:
        model_module.MMDiT.__init__ = original
        destroy_parallel()


# ----------------------------------------------------------------------------- the objective slot


class AffineModel(torch.nn.Module):
    """Predicts 0.3 * tokens + sigma + w, and remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.25))
        self.calls = []

    def forward(self, tokens, txt, txt_mask, sigmas, image_shapes):
        self.calls.append((tokens.detach().clone(), sigmas.detach().clone(), txt_mask, list(image_shapes)))
        return 0.3 * tokens + sigmas[:, None, None] + self.w


def old_flow_loss(model, batch, seed: int, step: int, first_index: int) -> torch.Tensor:
    """The training step's flow-matching loss as written before the objective slot, by hand:
    per sample a generator from (seed, step, index in the global batch) draws a logit-normal
    sigma (then Qwen-Image's resolution shift) and the noise; x_s = (1 - s) x0 + s noise; the
    target is noise - x0; the MSE covers the target image's tokens only."""
    latents = batch["latents"]
    b, c, h, w = latents.shape
    x0 = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    n = x0.shape[1]
    mu = 0.5 + (n - 256) * (0.9 - 0.5) / (8192 - 256)
    sigmas, noise = [], []
    for i in range(b):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + first_index + i)
        s = torch.sigmoid(torch.randn(1, generator=g, dtype=torch.float64)).clamp(1e-5, 1 - 1e-5)
        s = (math.exp(mu) / (math.exp(mu) + (1 / s - 1))).clamp(1e-5, 1 - 1e-5)
        sigmas.append(s.float())
        noise.append(torch.randn(x0.shape[1:], generator=g))
    sigmas, noise = torch.cat(sigmas), torch.stack(noise)
    x_s = (1 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
    cond = batch["cond_latents"]
    cond_tokens = cond.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
    pred = model(torch.cat([x_s, cond_tokens], dim=1), batch["prompt_embeds"], None, sigmas, [(1, h // 2, w // 2)] * 2)
    return ((pred[:, :n] - (noise - x0)) ** 2).mean()


def edit_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(2, 16, 8, 12, generator=g), "cond_latents": torch.randn(2, 16, 8, 12, generator=g),
            "prompt_embeds": torch.randn(2, 5, 64, generator=g), "prompt_mask": torch.ones(2, 5, dtype=torch.bool)}


def test_flow_objective_equals_the_old_step_loss():
    from mmdit.config.train import TrainConfig
    from mmdit.consumer.objectives import FlowObjective

    plan = _resolve(parallel=ParallelConfig(), device="cpu")
    batch = edit_batch()
    model = AffineModel()
    loss, figures = FlowObjective(TrainConfig(), seed=5, plan=plan).loss(model, batch, step=7, first_index=3)
    expected = old_flow_loss(AffineModel(), batch, seed=5, step=7, first_index=3)
    assert figures == {} and loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    loss.backward()
    assert model.w.grad is not None and model.w.grad != 0  # the loss reaches the parameters
    # another sample index draws other noise: the index, not the micro-batch split, keys it
    other, _ = FlowObjective(TrainConfig(), seed=5, plan=plan).loss(AffineModel(), batch, step=7, first_index=4)
    assert not torch.equal(other, loss)


def test_objective_names_match_the_config():
    from mmdit.config.train import OBJECTIVES
    from mmdit.consumer.objectives import BY_NAME

    assert set(BY_NAME) == set(OBJECTIVES)


class TowardsOne:
    """A test objective: every predicted velocity towards 1, and a figure of its own."""

    name = "towards_one"

    def __init__(self, cfg, plan):
        self.plan, self.set_up = plan, False

    @classmethod
    def from_config(cls, cfg, plan):
        return cls(cfg, plan)

    def setup(self, parallelized) -> None:
        assert parallelized.plan is self.plan and parallelized.backend is not None
        self.set_up = True

    def loss(self, model, batch, step, first_index):
        from mmdit.consumer.batch import StepInputs

        assert self.set_up
        inputs = StepInputs.from_batch(batch, self.plan.device, self.plan.compute_dtype)
        sigmas = torch.full((inputs.x0.shape[0],), 0.5)
        pred = model(inputs.x0, inputs.txt, inputs.txt_mask, sigmas, inputs.image_shapes).float()
        return (pred - 1).square().mean(), {"mean_prediction": pred.mean().detach()}


def test_an_objective_plugged_into_the_slot_is_what_the_trainer_minimizes(tmp_path, monkeypatch):
    """No change to the loop: the objective's loss is the step's loss (the model's first
    prediction is exactly 0 as its output head starts at zero, so the first loss is exactly 1),
    the optimizer lowers it, and the objective's own figures reach metrics.jsonl."""
    import mmdit.config.train
    from mmdit.config.loader import load_config
    from mmdit.consumer import objectives
    from mmdit.consumer.trainer import Trainer
    from mmdit.parallel.state import destroy_parallel

    monkeypatch.setattr(mmdit.config.train, "OBJECTIVES", (*mmdit.config.train.OBJECTIVES, "towards_one"))
    monkeypatch.setitem(objectives.BY_NAME, "towards_one", TowardsOne)
    cfg = load_config([f"run.dir={tmp_path}", "train.objective=towards_one", "train.steps=4", "train.tensorboard=false",
                       "train.random_height=64", "train.random_width=64", "optimizer.lr=2e-3",
                       "optimizer.warmup_steps=0", "optimizer.lr_schedule=constant"])
    try:
        summary = Trainer(cfg).run()
    finally:
        destroy_parallel()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert losses[0] == 1.0 and records[0]["objective"] == {"mean_prediction": 0.0}
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert records[-1]["objective"]["mean_prediction"] > 0  # moving towards 1
    assert summary["final_loss"] == losses[-1]
