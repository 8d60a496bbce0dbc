"""Flow-GRPO as a training objective (consumer/grpo_objective.py) with its reward slot
(consumer/rewards.py): the first update's ratio, a reused rollout's clip, failed rewards dropped
from their groups, and a tiny model that learns a latent target in the real trainer loop."""

import json

import numpy as np
import pytest
import torch

from mmdit.config.loader import load_config

SMALL = ["train.objective=grpo", "train.grpo.reward=latent_target", "train.grpo.width=32", "train.grpo.height=32",
         "train.grpo.sde_steps=4", "train.grpo.group_size=4", "train.grpo.prompts_per_step=2"]
LAST_REWARDS: list[torch.Tensor] = []


def some_fail(latents, prompts):
    """A user's reward (train.grpo.reward=test_grpo:some_fail): the latent target's, with images
    1-3 of group 0 and image 0 of group 1 failed (NaN) when both groups come in one chunk."""
    r = -(latents - 0.5).square().mean(dim=(1, 2, 3))
    LAST_REWARDS.append(r.clone())
    r[1:5] = float("nan")
    return r


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def build(one_thread):
    from mmdit.consumer.grpo_objective import GrpoObjective
    from mmdit.parallel.parallelize import parallelize
    from mmdit.parallel.state import destroy_parallel

    def make(*overrides):
        cfg = load_config([*SMALL, *overrides])
        built = parallelize(cfg.model, cfg.parallel, dtype="fp32", optimizer=None, seed=cfg.seed, device="cpu")
        obj = GrpoObjective(cfg, built.plan)
        obj.setup(built)
        return obj, built.model

    yield make
    destroy_parallel()


def sign_step(model, loss: torch.Tensor) -> None:
    """A fixed-size step against the gradient of `loss`: the policy moves off the rollout's."""
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad.sign()
    model.zero_grad()


def test_first_update_has_ratio_one_and_a_reused_rollout_clips(build):
    obj, model = build("train.grpo.kl_beta=0.5", "train.grpo.updates_per_rollout=2", "train.grpo.clip_range=1e-6")
    loss, f = obj.loss(model, {}, step=0, first_index=0)
    assert f["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5) and f["clip_fraction"].item() == 0.0
    assert f["images"].item() == 8 and f["kl"].item() == 0.0  # the policy is its reference
    assert abs(loss.item()) < 1e-6  # -mean(A) over whole groups is 0
    assert f["reward_std"].item() > 0 and f["advantage_abs_mean"].item() > 0.5
    sign_step(model, loss)
    loss2, f2 = obj.loss(model, {}, step=1, first_index=0)  # the same rollout, the updated policy
    assert f2["images"].item() == 0 and f2["reward_mean"].item() == f["reward_mean"].item()
    assert abs(f2["ratio_mean"].item() - 1.0) > 1e-4 and f2["clip_fraction"].item() > 0.5
    assert f2["kl"].item() > 0
    assert loss2.item() == pytest.approx(f2["policy_loss"].item() + 0.5 * f2["kl"].item(), rel=1e-5)
    _, f3 = obj.loss(model, {}, step=2, first_index=0)  # a new rollout
    assert f3["images"].item() == 8 and f3["reward_mean"].item() != f["reward_mean"].item()


def test_failed_rewards_leave_their_group_and_a_group_of_one_is_skipped(build):
    from mmdit.consumer.grpo import group_advantages

    obj, model = build("train.grpo.kl_beta=0", "train.grpo.reward=test_grpo:some_fail", "train.grpo.rollout_chunk=2")
    LAST_REWARDS.clear()
    loss, f = obj.loss(model, {}, step=3, first_index=0)
    assert f["dropped_samples"].item() == 4 and f["skipped_groups"].item() == 1
    survivors = LAST_REWARDS[-1][5:8]  # group 1 without its image 0
    assert f["advantage_abs_mean"].item() == pytest.approx(group_advantages(survivors[None]).abs().mean().item(),
                                                           rel=1e-5)
    assert f["reward_mean"].item() == pytest.approx(LAST_REWARDS[-1][[0, 5, 6, 7]].mean().item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_rollouts_and_a_micro_batched_update_give_the_same_step(build):
    """Per-group noise: the images do not depend on the chunking; the update's pieces add up to
    the one-piece loss and gradient, and only the last piece runs the DP all-reduce."""
    import contextlib

    from mmdit.consumer.grpo_objective import GrpoObjective

    class Backend:
        def __init__(self, model):
            self.model, self.unsynced = model, 0

        @contextlib.contextmanager
        def no_sync(self):
            self.unsynced += 1
            yield

    results = []
    for chunk, micro in ((2, 0), (1, 0), (1, 3)):
        obj, model = build("train.grpo.kl_beta=0.5", f"train.grpo.rollout_chunk={chunk}",
                           f"train.grpo.update_micro_batch={micro}", "train.grpo.train_steps=3")
        backend = Backend(model)
        loss, f = GrpoObjective.forward_backward(obj, backend, {}, 5, 2, scale=1.0, sync=True)
        pieces = len(obj._rollouts[2].chunks) * (1 if micro == 0 else -(-4 * 3 // micro))
        assert backend.unsynced == pieces - 1  # every piece but the last under no_sync
        results.append((loss.item(), f, grads_of(model)))
    (loss0, f0, g0) = results[0]
    for loss, f, g in results[1:]:
        assert loss == pytest.approx(loss0, rel=1e-5, abs=1e-7)
        assert f["reward_mean"].item() == f0["reward_mean"].item()  # the same images
        for name in ("kl", "clip_fraction", "ratio_mean", "advantage_abs_mean"):
            assert f[name].item() == pytest.approx(f0[name].item(), rel=1e-5, abs=1e-7), name
        assert g.keys() == g0.keys()
        for name, grad in g0.items():
            assert torch.allclose(g[name], grad, rtol=1e-4, atol=1e-7), name


def test_a_rollout_saved_mid_cycle_resumes_the_same_update(build):
    """updates_per_rollout=2: the state after step 0 holds the rollout step 1 trains on; loaded
    into a fresh objective it gives step 1's loss exactly, where a fresh objective rolls out anew."""
    overrides = ("train.grpo.kl_beta=0.1", "train.grpo.updates_per_rollout=2", "train.grpo.clip_range=0.5")
    obj, model = build(*overrides)
    loss, _ = obj.loss(model, {}, step=0, first_index=0)
    sign_step(model, loss)
    assert obj.state_dict(2) == {}  # a cycle's end: nothing left to train on
    state = obj.state_dict(1)
    assert state and all(t.is_contiguous() for t in state.values())
    expected, f_expected = obj.loss(model, {}, step=1, first_index=0)
    resumed, _ = build(*overrides)
    resumed.load_state_dict(state)
    got, f_got = resumed.loss(model, {}, step=1, first_index=0)
    assert got.item() == expected.item() and f_got["ratio_mean"].item() == f_expected["ratio_mean"].item()
    assert f_got["images"].item() == 0  # nothing sampled: the saved rollout was used
    fresh, _ = build(*overrides)
    other, f_other = fresh.loss(model, {}, step=1, first_index=0)
    assert f_other["images"].item() == 8 and other.item() != expected.item()


def test_grpo_resumed_mid_cycle_equals_the_uninterrupted_run(tmp_path, one_thread):
    """The trainer checkpoints the rollout of a cycle still in progress (objective/dp000) and
    the resumed run's losses equal those of a run that never stopped."""
    from mmdit.consumer.trainer import Trainer
    from mmdit.parallel.state import destroy_parallel

    def train(run, steps):
        try:
            Trainer(load_config([f"run.dir={run}", *SMALL, "train.grpo.updates_per_rollout=2",
                                 "train.grpo.clip_range=0.2", "train.grpo.kl_beta=0.1", "train.random_height=32",
                                 "train.random_width=32", "train.micro_batch_size=1", "train.tensorboard=false",
                                 f"train.steps={steps}", "optimizer.lr=1e-3", "checkpoint.async_save=false"])).run()
        finally:
            destroy_parallel()
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight = train(tmp_path / "straight", 3)
    train(tmp_path / "resumed", 1)
    from mmdit.consumer.checkpoint import checkpoint_dir

    assert (checkpoint_dir(tmp_path / "resumed", 1) / "objective" / "dp000.safetensors").is_file()
    resumed = train(tmp_path / "resumed", 3)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight[1:], resumed[1:]):
        assert a["loss"] == b["loss"] and a["objective"]["ratio_mean"] == b["objective"]["ratio_mean"]
    assert resumed[1]["objective"]["images"] == 0  # step 2 (index 1) trained on the saved rollout


def test_grpo_learns_a_latent_target_in_the_trainer_and_records_its_figures(tmp_path, one_thread):
    from mmdit.consumer.trainer import Trainer
    from mmdit.parallel.state import destroy_parallel

    run = tmp_path / "grpo"
    cfg = load_config([f"run.dir={run}", *SMALL, "train.grpo.group_size=8", "train.grpo.latent_target=3",
                       "train.grpo.kl_beta=0.01", "train.random_height=32", "train.random_width=32",
                       "train.micro_batch_size=1", "train.tensorboard=false", "train.steps=20",
                       "optimizer.lr=3e-3", "optimizer.warmup_steps=0", "optimizer.lr_schedule=constant",
                       "checkpoint.async_save=false"])
    try:
        Trainer(cfg).run()
    finally:
        destroy_parallel()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 20
    for name in ("reward_mean", "reward_std", "clip_fraction", "kl", "approx_kl", "dropped_samples", "rollout_s"):
        assert all(name in r["objective"] for r in records), name
    rewards = [r["objective"]["reward_mean"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 1.0, rewards  # about -10.2 -> -8.3: the rewards' spread in a step is about 0.3
    assert records[-1]["objective"]["kl"] > 0

    # throughput counts the rollout's images and the model's work, not the batches that pace the loop:
    # 4 SDE forwards of 2 x 8 images, then 64 transitions forward + backward and the reference's forward
    from mmdit.model.flops import step_flops

    tokens, text = (32 // 16) ** 2, cfg.train.random_text_len
    work = (4 * step_flops(cfg.model, 16, tokens, text, backward=False) + step_flops(cfg.model, 64, tokens, text)
            + step_flops(cfg.model, 64, tokens, text, backward=False))
    for r in records:
        assert r["global_batch_size"] == 16 and "model_flops" not in r["objective"]
        assert r["samples_per_second"] * r["step_time_s"] == pytest.approx(16, rel=1e-6)
        assert r["image_tokens_per_second"] * r["step_time_s"] == pytest.approx(16 * tokens, rel=1e-6)
        assert r["tflops_per_gpu"] * 1e12 * r["step_time_s"] == pytest.approx(work, rel=1e-5)


@pytest.mark.slow
def test_a_grpo_step_with_cfg_at_tp2_equals_tp1(tmp_path, one_thread):
    """Real processes: both TP ranks roll out the same images (same noise, same prompts), and the
    loss, the figures and every gradient equal TP=1's; the reference (from a checkpoint) differs
    from the policy, so the KL term is live."""
    from grpo_workers import grpo_step
    from model_workers import random_full_state_dict

    from mmdit.model.checkpoint import save_full_state_dict
    from mmdit.model.mmdit import build_mmdit
    from mmdit.model.sharding import diffusers_partition_dims
    from mmdit.parallel.spawn import spawn
    from mmdit.parallel.state import destroy_parallel, tp_group

    tiny = load_config([]).model
    try:
        policy, ref = random_full_state_dict(tiny, seed=1), random_full_state_dict(tiny, seed=2)
        dims = diffusers_partition_dims(build_mmdit(tiny, tp_group(), device="meta"))
        save_full_state_dict(ref, tiny, dims, tmp_path / "ref", tp=1)
        single = grpo_step(0, 1, policy, str(tmp_path / "ref"))
    finally:
        destroy_parallel()
    assert single["figures"]["kl"].item() > 1e-4 and single["figures"]["advantage_abs_mean"].item() > 0.5
    for r in spawn(grpo_step, 2, 2, policy, str(tmp_path / "ref")):
        assert r["loss"].item() == pytest.approx(single["loss"].item(), rel=1e-4, abs=1e-6)
        for name, value in single["figures"].items():
            if not name.endswith("_s"):  # timings
                assert r["figures"][name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name
        assert r["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            assert (r["grads"][name] - grad).abs().max().item() <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_the_ocr_reward_decodes_as_the_sampler_and_scores_word_accuracy(tiny_encoders_dir):
    """ocr on encoders.dir's (tiny, random) VAE: its pixels are the sampler's decode of the same
    latents; a reading of such an image matches no target word (0), a target without words is 1."""
    from mmdit.config.produce import EncodersConfig
    from mmdit.consumer.rewards import OcrReward, decode_latents
    from mmdit.consumer.sample import Sampler
    from mmdit.consumer.text_eval.prompts import TextPrompt
    from mmdit.producer.encoders import Encoders

    enc = Encoders.load(EncodersConfig(dir=tiny_encoders_dir))
    latents = torch.randn(2, enc.latent_channels, 4, 6, generator=torch.Generator().manual_seed(0))
    pixels = decode_latents(enc.vae, latents, enc.device, enc.dtype)
    expected = Sampler(torch.nn.Identity(), None, enc).decode(latents[1:])
    assert torch.equal(((pixels[1] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0),
                       torch.from_numpy(np.array(expected)))
    prompts = [TextPrompt("a", 'a sign "OPEN LATE"', ("OPEN LATE",), "en", "single_line"),
               TextPrompt("b", "a blank wall", (), "en", "single_line")]
    assert OcrReward(enc, threads=1)(latents, prompts).tolist() == [0.0, 1.0]


@pytest.mark.slow
def test_a_reward_worker_killed_mid_request_costs_a_retry_not_a_sample(tmp_path, monkeypatch):
    """train.grpo.reward_workers=2: the first request's worker SIGKILLs itself; the request is
    retried whole on a fresh pool and every image gets exactly its own reward."""
    from mmdit.consumer.rewards import LatentTarget, RewardWorkers
    from mmdit.consumer.text_eval.prompts import TextPrompt

    monkeypatch.setenv("GRPO_DIE_ONCE", str(tmp_path / "died"))
    cfg = load_config([*SMALL, "train.grpo.reward=reward_fns:dies_once", "train.grpo.reward_workers=2"])
    workers = RewardWorkers(cfg.train.grpo, cfg.encoders, 2)
    latents = torch.randn(5, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    prompts = [TextPrompt(str(i), "p", (), "en", "single_line") for i in range(5)]
    try:
        got = workers(latents, prompts)
        assert (tmp_path / "died").exists() and workers.retries == 1
        assert torch.allclose(got, LatentTarget(0.5)(latents, prompts), rtol=0, atol=1e-6)
        assert torch.allclose(workers(latents[:2], prompts[:2]), got[:2]) and workers.retries == 1
    finally:
        workers.close()
