"""Flow-GRPO as a training objective (`train.objective=grpo`, settings in `train.grpo`).

Each micro-batch of each optimizer step, on every DP rank:
1. **Prompts**: `prompts_per_step` prompts drawn from the JSONL set (the text-eval format:
   prompt, target_texts) by a generator keyed by (seed, step, first_index), so every TP rank of
   the group draws the same ones and a different DP rank or micro-batch other ones.
2. **Rollout**: the TP group samples G = `group_size` images per prompt together with the SDE
   sampler (model/flow_sde.py `sde_sample`, T = `sde_steps`), the noise drawn on the CPU from the
   same key (identical on every TP rank), with true CFG when `cfg_scale` > 1. The states and each
   transition's log-probability are recorded (no graph).
3. **Reward** (consumer/rewards.py) of the final latents, computed by TP rank 0 of the group and
   broadcast to the others; a NaN reward drops its sample from its
   group, a group with fewer than 2 samples left is skipped (both counted in the figures).
4. **Update**: group advantages and the clipped-ratio loss with kl_beta * KL to the frozen
   reference (consumer/grpo.py), over the surviving samples' transitions (all T, or a random
   `train_steps` of them), in one forward of the policy (and one of the reference).

With `updates_per_rollout` = K > 1 a rollout made at step k*K serves the K optimizer steps from
there; only the first sees ratio 1. The rollout lives in memory: a run resumed mid-cycle rolls
out anew with the resumed weights.

The trainer's batches are not used: GRPO runs with `train.data_source=random`, whose batches only
pace the loop (their shapes also enter the throughput figures, which thus do not count rollouts).
Prompt features come from encoders.dir's Qwen2.5-VL (loaded on first use); without encoders.dir
each prompt gets a fixed random embedding (seeded by its index: toy and test runs only).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.consumer.dpo import BaseOfPolicy, build_reference
from mmdit.consumer.grpo import group_advantages, grpo_loss
from mmdit.consumer.rewards import RewardWorkers, build_reward
from mmdit.model.flow_sde import sde_log_prob, sde_sample, sde_step_kl
from mmdit.model.mmdit import pack_latents, packed_shape, unpack_latents
from mmdit.parallel.parallelize import Parallelized, Plan
from mmdit.parallel.state import tp_group

NEGATIVE_PROMPT = " "
"""The negative prompt of CFG (QwenImagePipeline's examples' default)."""
LATENT_CHANNELS = 16


def pad_texts(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[L_i, D] each -> zero-padded [B, Lmax, D] and its mask [B, Lmax] (None when nothing is padded)."""
    length = max(t.shape[0] for t in texts)
    out = torch.zeros(len(texts), length, texts[0].shape[1], dtype=texts[0].dtype)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, t in enumerate(texts):
        out[i, :t.shape[0]], mask[i, :t.shape[0]] = t, True
    return out, None if bool(mask.all()) else mask


def cat_texts(a: torch.Tensor, a_mask, b: torch.Tensor, b_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two padded text batches [B, L_a, D] and [B, L_b, D] (masks or None) -> one [2B, L, D] and its mask."""
    length = max(a.shape[1], b.shape[1])

    def grow(t, m):
        m = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
        return F.pad(t, (0, 0, 0, length - t.shape[1])), F.pad(m, (0, length - t.shape[1]), value=False)

    (a, a_mask), (b, b_mask) = grow(a, a_mask), grow(b, b_mask)
    mask = torch.cat([a_mask, b_mask])
    return torch.cat([a, b]), None if bool(mask.all()) else mask


def group_survivors(rewards: torch.Tensor) -> tuple[list[torch.Tensor], int, int]:
    """rewards [P, G] (NaN: failed) -> (the kept sample indices of each usable group, samples
    dropped, groups skipped): a group needs 2 finite rewards to teach anything."""
    kept, dropped, skipped = [], 0, 0
    for p in range(rewards.shape[0]):
        finite = torch.isfinite(rewards[p]).nonzero().flatten()
        dropped += rewards.shape[1] - finite.numel()
        if finite.numel() < 2:
            skipped += 1
            continue
        kept.append(p * rewards.shape[1] + finite)
    return kept, dropped, skipped


class GrpoObjective:
    name = "grpo"

    def __init__(self, cfg: JobConfig, plan: Plan, reference_builder=build_reference, encoders=None):
        from mmdit.consumer.text_eval.prompts import load_prompts

        self.cfg, self.plan, self.g, self.seed = cfg, plan, cfg.train.grpo, cfg.seed
        if self.g.reward == "ocr" and not cfg.encoders.dir and encoders is None:
            raise ConfigError("invalid config: train.grpo.reward=ocr needs encoders.dir (its VAE decodes the images)")
        self.prompts = load_prompts(self.g.prompts or None)
        self.reference_builder = reference_builder
        self.reference = None
        self._encoders = encoders
        self.reward = RewardWorkers(self.g, cfg.encoders, self.g.reward_workers) if self.g.reward_workers \
            else build_reward(self.g, self.encoders)
        self._features: dict[int, torch.Tensor] = {}
        self._rollouts: dict[int, tuple[int, dict]] = {}  # first_index -> (rollout step, rollout)

    @classmethod
    def from_config(cls, cfg: JobConfig, plan: Plan) -> GrpoObjective:
        return cls(cfg, plan)

    def setup(self, parallelized: Parallelized) -> None:
        if not self.g.kl_beta:
            return  # no KL term: no reference
        if getattr(parallelized, "lora", False):
            self.reference = BaseOfPolicy(parallelized.model)
        else:
            self.reference = self.reference_builder(self.cfg, self.plan)

    def encoders(self):
        if self._encoders is None and self.cfg.encoders.dir:
            from mmdit.producer.encoders import Encoders

            self._encoders = Encoders.load(self.cfg.encoders)
        return self._encoders

    def features(self, index: int) -> torch.Tensor:
        """Prompt `index`'s features [L, D] (float32, CPU); index -1 is the negative prompt."""
        if index not in self._features:
            text = NEGATIVE_PROMPT if index < 0 else self.prompts[index].prompt
            enc = self.encoders() if self.cfg.encoders.dir or self._encoders is not None else None
            if enc is not None:
                self._features[index] = enc.encode_prompts([text])[0].float()
            else:  # no encoders: a fixed random embedding per prompt (toy and test runs)
                g = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + index)
                self._features[index] = torch.randn(self.cfg.train.random_text_len,
                                                    self.cfg.model.joint_attention_dim, generator=g)
        return self._features[index]

    def velocity(self, model, x, sigma, txt, mask, neg, neg_mask, shapes) -> torch.Tensor:
        """The (guided, with cfg_scale > 1) velocity [B, N, C] float32 of `model` at (x, sigma [B])."""
        plan = self.plan
        b, guided = x.shape[0], neg is not None
        if guided:  # one forward over the prompts and the negatives side by side
            txt, mask = cat_texts(txt, mask, neg, neg_mask)
            x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        with torch.autocast(plan.device.type, dtype=plan.compute_dtype, enabled=plan.autocast):
            out = model(x.to(plan.device, plan.compute_dtype), txt.to(plan.device, plan.compute_dtype),
                        None if mask is None else mask.to(plan.device), sigma.to(plan.device), shapes)
        v = out.float()
        if guided:  # QwenImagePipeline's true CFG with its norm rescale
            v, v_neg = v[:b], v[b:]
            comb = v_neg + self.g.cfg_scale * (v - v_neg)
            v = comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return v

    def score(self, latents: torch.Tensor, prompts: list) -> torch.Tensor:
        """The rewards [B] of the final latents: TP rank 0 of the group computes them, the others
        receive them (every rank holds the same latents; an OCR reward would run TP times)."""
        group = tp_group() if dist.is_initialized() else None
        if group is None or dist.get_world_size(group) == 1:
            return self.reward(latents, prompts).float()
        if dist.get_rank(group) == 0:
            rewards = self.reward(latents, prompts).float().to(self.plan.device)
        else:
            rewards = torch.empty(latents.shape[0], dtype=torch.float32, device=self.plan.device)
        dist.broadcast(rewards, src=dist.get_global_rank(group, 0), group=group)
        return rewards.cpu()

    def rollout(self, model, step: int, first_index: int) -> dict:
        """Sample G images for each of this micro-batch's prompts with the SDE and score them."""
        g, started = self.g, time.perf_counter()
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 100_003 + first_index)
        picks = torch.randint(len(self.prompts), (g.prompts_per_step,), generator=gen).tolist()
        index = [p for p in picks for _ in range(g.group_size)]  # prompt of each image, grouped
        txt, mask = pad_texts([self.features(i) for i in index])
        neg = neg_mask = None
        if g.cfg_scale > 1:
            neg, neg_mask = pad_texts([self.features(-1)] * len(index))
        h, w = g.height // 8, g.width // 8
        shapes = [packed_shape(h, w)]
        noise = pack_latents(torch.randn(len(index), LATENT_CHANNELS, h, w, generator=gen))
        was_training = model.training
        model.eval()
        try:
            traj = sde_sample(lambda x, s: self.velocity(model, x, s, txt, mask, neg, neg_mask, shapes).cpu(),
                              noise, g.sde_steps, noise.shape[1], a=g.a, t_max=g.t_max, generator=gen)
        finally:
            model.train(was_training)
        sampled = time.perf_counter()
        rewards = self.score(unpack_latents(traj.sample, h, w), [self.prompts[i] for i in index])
        if g.train_steps:
            steps = torch.randperm(g.sde_steps, generator=gen)[:g.train_steps].sort().values
        else:
            steps = torch.arange(g.sde_steps)
        return {"traj": traj, "txt": txt, "mask": mask, "neg": neg, "neg_mask": neg_mask, "shapes": shapes,
                "rewards": rewards.view(g.prompts_per_step, g.group_size), "steps": steps,
                "rollout_s": sampled - started, "reward_s": time.perf_counter() - sampled}

    def loss(self, model, batch: dict, step: int, first_index: int) -> tuple[torch.Tensor, dict]:
        g = self.g
        if g.kl_beta and self.reference is None:
            raise RuntimeError("GrpoObjective.setup() builds the reference model; call it first")
        rollout_step = step - step % g.updates_per_rollout
        cached = self._rollouts.get(first_index)
        if cached is None or cached[0] != rollout_step:
            cached = (rollout_step, self.rollout(model, rollout_step, first_index))
            self._rollouts[first_index] = cached
        r = cached[1]
        fresh = cached[0] == step
        rewards = r["rewards"]
        kept, dropped, skipped = group_survivors(rewards)
        flat = rewards.reshape(-1)
        if kept:
            samples = torch.cat(kept)
            advantages = torch.cat([group_advantages(flat[k][None])[0] for k in kept])
        else:  # nothing to learn: a zero loss that still runs the model (every rank does a backward)
            samples, advantages = torch.arange(flat.numel()), torch.zeros(flat.numel())
        traj, steps = r["traj"], r["steps"]
        k, b = steps.numel(), samples.numel()
        dev = self.plan.device  # the rollout is kept on the CPU; the update runs where the model does
        x = traj.states[steps][:, samples].flatten(0, 1).to(dev)  # [k * b, N, C]
        x_next = traj.states[steps + 1][:, samples].flatten(0, 1).to(dev)
        times = torch.tensor(traj.times, dtype=torch.float32)
        t, t_next = times[steps].repeat_interleave(b).to(dev), times[steps + 1].repeat_interleave(b).to(dev)
        old = traj.log_probs[steps][:, samples].flatten().to(dev)

        def take(v):
            return None if v is None else v[samples].repeat(k, *([1] * (v.dim() - 1)))

        txt, mask, neg, neg_mask = take(r["txt"]), take(r["mask"]), take(r["neg"]), take(r["neg_mask"])
        v = self.velocity(model, x, t, txt, mask, neg, neg_mask, r["shapes"])
        log_prob = sde_log_prob(x, x_next, v, t, t_next, a=g.a, t_max=g.t_max)
        kl = None
        if self.reference is not None:
            with torch.no_grad():
                v_ref = self.velocity(self.reference, x, t, txt, mask, neg, neg_mask, r["shapes"])
            kl = sde_step_kl(v, v_ref, t, t_next, a=g.a, t_max=g.t_max)
        loss, figures = grpo_loss(log_prob, old, advantages.repeat(k).to(dev), g.clip_range, kl, g.kl_beta)
        if not kept:
            loss = loss * 0.0
        finite = flat[torch.isfinite(flat)]
        figures.setdefault("kl", torch.zeros(()))
        figures.update({
            "reward_mean": finite.mean() if finite.numel() else torch.tensor(float("nan")),
            "reward_std": finite.std(correction=0) if finite.numel() else torch.tensor(float("nan")),
            "advantage_abs_mean": advantages.abs().mean(),
            "dropped_samples": torch.tensor(float(dropped)), "skipped_groups": torch.tensor(float(skipped)),
            "rollout_s": torch.tensor(r["rollout_s"] if fresh else 0.0),
            "reward_s": torch.tensor(r["reward_s"] if fresh else 0.0),
            "images": torch.tensor(float(flat.numel() if fresh else 0)),
            "reward_retries": torch.tensor(float(getattr(self.reward, "retries", 0))),
        })
        return loss, figures
