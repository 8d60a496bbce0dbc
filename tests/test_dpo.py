"""Diffusion-DPO (consumer/dpo.py): the loss against an independent computation, its beta -> 0
limit, and one step at TP=2 (with and without sequence parallelism) equal to TP=1."""

import math
from types import SimpleNamespace

import pytest
import torch
from dpo_workers import dpo_step, pair_batch

from mmdit.config.loader import load_config
from mmdit.parallel.spawn import spawn

TINY = load_config([]).model


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded shared machine, spinning worker threads only slow a tiny model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Affine(torch.nn.Module):
    """Predicts a * tokens + b * sigma + c: a policy (trainable) or a reference (frozen)."""

    def __init__(self, a: float, b: float, c: float):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(float(v))) for v in (a, b, c))

    def forward(self, tokens, txt, txt_mask, sigmas, image_shapes):
        assert tokens.shape[0] == txt.shape[0] == sigmas.shape[0]  # preferred and rejected side by side
        return self.a * tokens + self.b * sigmas[:, None, None] + self.c


def objective(beta: float, reference: torch.nn.Module, seed: int = 5):
    from mmdit.consumer.dpo import DpoObjective
    from mmdit.parallel.parallelize import resolve

    cfg = load_config(["train.objective=dpo", f"train.dpo.beta={beta}", f"seed={seed}"])
    obj = DpoObjective(cfg, resolve(cfg.parallel, device="cpu"), reference_builder=lambda cfg, plan: reference)
    obj.setup(None)
    return obj


def by_hand(policy, reference, batch, beta: float, seed: int, step: int, first_index: int):
    """Eq. 3 written out: per pair one generator from (seed, step, index) draws s ~ U(0, 1) and
    the noise, shared by both images; err = mean squared velocity error; the logistic loss."""
    def pack(x):
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    win, lose = pack(batch["latents"]), pack(batch["cond_latents"])
    losses, margins = [], []
    for i in range(win.shape[0]):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + first_index + i)
        s = torch.rand(1, generator=g, dtype=torch.float64).clamp(1e-5, 1 - 1e-5).float()
        noise = torch.randn(win.shape[1:], generator=g)

        def err(model, x0, s=s, noise=noise):
            x_s = (1 - s) * x0 + s * noise
            return (model(x_s[None], torch.zeros(1, 1, 1), None, s, None)[0] - (noise - x0)).pow(2).mean()

        d_policy = err(policy, win[i]) - err(policy, lose[i])
        d_ref = err(reference, win[i]) - err(reference, lose[i])
        margin = -beta * (d_policy - d_ref)
        losses.append(math.log(1 + math.exp(-margin.item())))
        margins.append(margin.item())
    return sum(losses) / len(losses), margins


def test_dpo_loss_equals_an_independent_computation():
    batch = pair_batch(TINY)
    policy, reference = Affine(0.3, -0.7, 0.1), Affine(0.1, -0.9, 0.0)
    loss, figures = objective(2.0, reference).loss(policy, batch, step=7, first_index=3)
    expected, margins = by_hand(policy, reference, batch, 2.0, seed=5, step=7, first_index=3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert figures["reward_margin"].item() == pytest.approx(sum(margins) / len(margins), rel=1e-5)
    assert figures["preference_accuracy"].item() == sum(m > 0 for m in margins) / len(margins)
    assert len({m > 0 for m in margins}) == 2 or abs(loss.item() - math.log(2)) > 1e-3  # a case that tells
    loss.backward()
    assert all(p.grad is not None and p.grad != 0 for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())  # the reference gets no gradient
    other, _ = objective(2.0, reference).loss(Affine(0.3, -0.7, 0.1), batch, step=7, first_index=4)
    assert other.item() != pytest.approx(loss.item(), rel=1e-6)  # the pair's index keys its noise


def test_beta_to_zero_gives_log_two_and_a_policy_equal_to_its_reference_too():
    batch = pair_batch(TINY)
    policy = Affine(0.3, -0.7, 0.1)
    loss, figures = objective(1e-9, Affine(-1.0, 2.0, 0.5)).loss(policy, batch, step=0, first_index=0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    loss, figures = objective(1000.0, Affine(0.3, -0.7, 0.1)).loss(policy, batch, step=0, first_index=0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and figures["reward_margin"].item() == 0
    assert figures["preference_accuracy"].item() == 0  # no pair is preferred yet


def test_dpo_refuses_batches_that_are_not_pairs():
    batch = {**pair_batch(TINY), "task": ["edit", "edit"]}
    with pytest.raises(ValueError, match="preference pairs"):
        objective(1.0, Affine(0, 0, 0)).loss(Affine(0, 0, 0), batch, step=0, first_index=0)


@pytest.mark.slow
def test_a_dpo_step_at_tp2_with_and_without_sequence_parallel_equals_tp1(tmp_path, one_thread):
    """Real processes: the reference built by setup() at each TP from a checkpoint, the policy
    from other weights; the loss, the figures and every gradient agree."""
    from model_workers import random_full_state_dict

    from mmdit.model.checkpoint import save_full_state_dict
    from mmdit.model.mmdit import build_mmdit
    from mmdit.model.sharding import diffusers_partition_dims
    from mmdit.parallel.state import destroy_parallel, tp_group

    try:
        policy, ref = random_full_state_dict(TINY, seed=1), random_full_state_dict(TINY, seed=2)
        dims = diffusers_partition_dims(build_mmdit(TINY, tp_group(), device="meta"))
        save_full_state_dict(ref, TINY, dims, tmp_path / "ref", tp=1)
        [single] = dpo_step(0, 1, policy, str(tmp_path / "ref"), 3.0)
    finally:
        destroy_parallel()
    assert 0.01 < abs(single["figures"]["reward_margin"].item())  # the reference differs from the policy
    results = spawn(dpo_step, 2, 2, policy, str(tmp_path / "ref"), 3.0, (False, True))
    for rank_results in results:
        assert [r["sequence_parallel"] for r in rank_results] == [False, True]
        for r in rank_results:
            assert r["loss"].item() == pytest.approx(single["loss"].item(), abs=1e-5)
            for name, value in single["figures"].items():
                assert r["figures"][name].item() == pytest.approx(value.item(), abs=1e-5), name
            assert r["grads"].keys() == single["grads"].keys()
            for name, grad in single["grads"].items():
                assert (r["grads"][name] - grad).abs().max().item() <= 1e-5, name


def test_dpo_learns_a_preference_that_holds_on_held_out_pairs_and_shifts_sampling(one_thread):
    """Tiny pairs whose preferred latents add a fixed pattern that the rejected ones subtract: 10
    DPO steps from the reference take the held-out preference accuracy from 0 (policy = reference:
    no margin) to clearly above chance, and samples drawn from noise lean towards the pattern."""
    from dpo_workers import dpo_learning

    result = dpo_learning(steps=10, beta=20.0, lr=1e-3)
    print({k: v for k, v in result.items() if k != "losses"})
    assert result["before"]["preference_accuracy"] == 0 and result["before"]["reward_margin"] == 0
    assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert result["after"]["preference_accuracy"] >= 0.8 and result["after"]["reward_margin"] > 1
    assert result["lean_policy"] > result["lean_reference"] + 0.03


def test_the_objectives_figures_reach_prometheus_and_the_dashboard_series():
    from prometheus_client import CollectorRegistry, generate_latest

    from mmdit.config.service import ServiceConfig
    from mmdit.dataservice.coordinator import Coordinator
    from mmdit.dataservice.plan import DataVersion, SampleRef, Selection
    from mmdit.dataservice.telemetry import PrometheusCollector

    refs = [SampleRef(f"k{i}", (256, 256), "pair", cond_bucket=(256, 256)) for i in range(8)]
    c = Coordinator(Selection(refs), ServiceConfig(plan_ahead=4), 0, 2, 1, [DataVersion(0, 0, 0)])
    c.register_consumer("t0", 9, 0, 2, 1, None, None)
    for step, accuracy in ((1, 0.5), (2, 0.75)):
        c.ack("t0", 0, c.gen, [], {"step": step, "loss": 0.6, "config_version": 0,
                                   "objective": {"reward_margin": 0.25 * step, "preference_accuracy": accuracy,
                                                 "bad": "not a number"}})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(c, c.telemetry))
    text = generate_latest(registry).decode()
    assert 'mmdit_objective{dp_rank="0",figure="preference_accuracy"} 0.75' in text
    assert 'mmdit_objective{dp_rank="0",figure="reward_margin"} 0.5' in text and 'figure="bad"' not in text
    series = c.telemetry.series()["objective"]
    assert series["preference_accuracy"] == [0.5, 0.75] and series["reward_margin"] == [0.25, 0.5]
    assert len(series["time"]) == 2


def test_with_lora_the_reference_is_the_policy_with_its_adapters_off():
    """No second model: the reference pass runs the policy's own base (adapters switched off), so
    it equals a separately built base model, and the adapters are on again afterwards."""
    from lora_workers import lora_model, random_adapters
    from model_workers import random_full_state_dict

    from mmdit.model.lora import adapters

    state = random_full_state_dict(TINY, seed=7)
    policy = lora_model(TINY, state, random_adapters(TINY, state, seed=2))
    base = lora_model(TINY, state, None)  # B = 0: exactly the base
    batch = pair_batch(TINY)

    def never(cfg, plan):
        raise AssertionError("a LoRA policy needs no reference copy")

    shared = objective(50.0, None)
    shared.reference_builder = never
    shared.setup(SimpleNamespace(lora=True, model=policy))
    separate = objective(50.0, base)
    loss, figures = shared.loss(policy, batch, step=3, first_index=0)
    expected, expected_figures = separate.loss(policy, batch, step=3, first_index=0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert figures["reward_margin"].item() == pytest.approx(expected_figures["reward_margin"].item(), rel=1e-5)
    assert figures["reward_margin"].item() != 0  # the adapters do change the policy
    assert all(a.enabled for _, a in adapters(policy))
