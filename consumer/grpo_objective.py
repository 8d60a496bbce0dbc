"""Flow-GRPO as a training objective (`train.objective=grpo`, settings in `train.grpo`).

Each micro-batch of each optimizer step, on every DP rank:
1. **Prompts**: `prompts_per_step` prompts drawn from the JSONL set (the text-eval format:
   prompt, target_texts) by a generator keyed by (seed, step, first_index): every TP rank of the
   group draws the same ones, another DP rank or micro-batch other ones, and a resumed run the
   same ones again (the "prompt cursor" is the step, nothing to save).
2. **Rollout in chunks**: the TP group samples G = `group_size` images per prompt together with
   the SDE sampler (model/flow_sde.py `sde_sample`, T = `sde_steps`), `rollout_chunk` prompts'
   groups at a time, true CFG when `cfg_scale` > 1. Each group's noise comes from its own
   generator keyed by (seed, step, first_index, group), drawn on the CPU: the same images whatever
   the chunking, the TP size or the device. The states and each transition's log-probability are
   recorded (no graph).
3. **Rewards while sampling on**: as soon as a chunk is sampled, TP rank 0 of the group submits
   its final latents to the reward (consumer/rewards.py; `train.grpo.reward_service`: to reward
   workers on the data service's RPC group, consumer/reward_service.py) and samples the next
   chunk while they are scored. The update of a chunk waits only for that chunk's rewards, so the
   last chunks are scored while the first ones train. TP rank 0 broadcasts each chunk's rewards
   to its TP group. A NaN reward drops its sample from its group, a group with fewer than 2
   samples left is skipped (both counted in the figures).
4. **Update, micro-batched**: group advantages and the clipped-ratio loss with kl_beta * KL to the
   frozen reference (consumer/grpo.py) over the surviving samples' transitions (all T, or a random
   `train_steps` of them), at most `update_micro_batch` transitions per forward and backward. The
   loss is the sum over transitions divided by the planned count (prompts x G x trained steps):
   a dropped sample adds 0, so a chunk's share of the gradient never waits for another chunk's
   rewards. Gradients accumulate over the pieces without a DP all-reduce until the step's last.

With `updates_per_rollout` = K > 1 a rollout made at step k*K serves the K optimizer steps from
there; only the first sees ratio 1. A checkpoint taken mid-cycle saves the rollout
(`state_dict`: objective/dpNN.safetensors) so that the resumed run trains on it exactly as the
uninterrupted run would.

The trainer's batches are not used: GRPO runs with `train.data_source=random`, whose batches only
pace the loop (their shapes also enter the throughput figures, which thus do not count rollouts).
Prompt features come from encoders.dir's Qwen2.5-VL (loaded on first use); without encoders.dir
each prompt gets a fixed random embedding (seeded by its text: toy and test runs only).
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.consumer.dpo import BaseOfPolicy, build_reference
from mmdit.consumer.grpo import group_advantages, grpo_loss
from mmdit.consumer.rewards import RewardWorkers, build_reward
from mmdit.model.flops import step_flops
from mmdit.model.flow_sde import Trajectory, sde_log_prob, sde_sample, sde_step_kl
from mmdit.model.mmdit import pack_latents, packed_shape, unpack_latents
from mmdit.parallel.parallelize import Parallelized, Plan
from mmdit.parallel.state import dp_group, tp_group

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


@dataclass
class Chunk:
    """`rollout_chunk` prompts' groups of one rollout: sampled together, scored together."""

    prompts: list[int]
    """The prompt of each group."""
    trajectory: Trajectory
    """states [T + 1, n, N, C] and log_probs [T, n] of its n = groups x G images, group by group."""
    txt: torch.Tensor
    mask: torch.Tensor | None
    neg: torch.Tensor | None
    neg_mask: torch.Tensor | None
    scoring: Future | None = None
    """The rewards on their way (TP rank 0 only)."""
    rewards: torch.Tensor | None = None
    """[groups, G] once in (NaN: failed)."""
    scored_at: float = 0.0


@dataclass
class Rollout:
    step: int
    chunks: list[Chunk]
    steps: torch.Tensor
    """The transitions trained on (indices into the T steps, ascending)."""
    shapes: list
    times: list[float]
    rollout_s: float
    model_flops: int
    """Of its sampling: T forwards of every image (with CFG, of its negative too)."""
    submitted_at: float = 0.0
    reported: bool = False
    """Its images and timings are in a step's figures already (a loaded one's were, before the stop)."""


class GrpoObjective:
    name = "grpo"

    def __init__(self, cfg: JobConfig, plan: Plan, reference_builder=build_reference, encoders=None):
        from mmdit.consumer.text_eval.prompts import load_prompts

        self.cfg, self.plan, self.g, self.seed = cfg, plan, cfg.train.grpo, cfg.seed
        if self.g.reward in ("ocr", "alignment") and not self.g.reward_service and not cfg.encoders.dir \
                and encoders is None:
            raise ConfigError(f"invalid config: train.grpo.reward={self.g.reward} needs encoders.dir (its VAE "
                              "decodes the images)")
        self.prompts = load_prompts(self.g.prompts or None)
        self.reference_builder = reference_builder
        self.reference = None
        self._encoders = encoders
        self._reward = None
        self._features: dict[int, torch.Tensor] = {}
        self._rollouts: dict[int, Rollout] = {}  # first_index -> its latest rollout

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

    def close(self) -> None:
        """Stop the reward (its thread, its worker processes, or leave the reward service)."""
        if self._reward is not None and hasattr(self._reward, "close"):
            self._reward.close()
        self._reward = None

    def report(self, figures: dict) -> None:
        """A step's telemetry (dataservice/telemetry.py fields): with the reward service, this
        rank's scorer sends it to the service's /metrics and dashboard (a GRPO run has no data
        client whose acks would carry it)."""
        if self._reward is not None and hasattr(self._reward, "report"):
            group = dp_group() if dist.is_initialized() else None
            self._reward.report(dist.get_rank(group) if group is not None else 0, figures)

    @property
    def reward(self):
        """The reward slot, built on first use: only TP rank 0 of a group ever scores."""
        if self._reward is None:
            g = self.g
            if g.reward_service:
                from mmdit.consumer.reward_service import RemoteRewards

                self._reward = RemoteRewards(self.cfg.service, g)
            elif g.reward_workers:
                self._reward = RewardWorkers(g, self.cfg.encoders, g.reward_workers)
            else:
                self._reward = build_reward(g, self.encoders)
        return self._reward

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
            else:  # no encoders: a fixed random embedding per prompt text (toy and test runs)
                g = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + zlib.crc32(text.encode()))
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

    def velocity_flops(self, images: int, shapes, txt, neg, backward: bool) -> int:
        """Model FLOPs of `velocity` on `images` samples (plus its backward when `backward`): with
        CFG, one forward of twice the images, the texts padded to the longer of the two."""
        (_, h, w), = shapes
        text_tokens = txt.shape[1] if neg is None else max(txt.shape[1], neg.shape[1])
        return step_flops(self.cfg.model, images * (1 if neg is None else 2), h * w, text_tokens,
                          backward=backward)

    # ---- rollout

    def _key(self, step: int, first_index: int, group: int = -1) -> int:
        """The seed of a rollout's draws (group -1: prompts and trained steps) or of one group's noise."""
        return (((self.seed * 1_000_003 + step) * 100_003 + first_index) * 1_009 + group + 1) % 2**63

    def _scorer(self) -> bool:
        """Whether this rank scores: TP rank 0 of its group (the others receive the rewards)."""
        group = tp_group() if dist.is_initialized() else None
        return group is None or dist.get_rank(group) == 0

    def rollout(self, model, step: int, first_index: int) -> Rollout:
        """Sample G images for each of this micro-batch's prompts with the SDE, chunk by chunk,
        each chunk sent to be scored as soon as it is sampled."""
        g, started = self.g, time.perf_counter()
        gen = torch.Generator().manual_seed(self._key(step, first_index))
        picks = torch.randint(len(self.prompts), (g.prompts_per_step,), generator=gen).tolist()
        steps = torch.randperm(g.sde_steps, generator=gen)[:g.train_steps].sort().values if g.train_steps \
            else torch.arange(g.sde_steps)
        h, w = g.height // 8, g.width // 8
        shapes = [packed_shape(h, w)]
        scorer = self._scorer()
        chunks, submitted_at, flops = [], 0.0, 0
        was_training = model.training
        model.eval()
        try:
            for lo in range(0, len(picks), g.rollout_chunk):
                groups = list(range(lo, min(lo + g.rollout_chunk, len(picks))))
                prompts = [picks[i] for i in groups]
                index = [p for p in prompts for _ in range(g.group_size)]  # prompt of each image, grouped
                txt, mask = pad_texts([self.features(i) for i in index])
                neg = neg_mask = None
                if g.cfg_scale > 1:
                    neg, neg_mask = pad_texts([self.features(-1)] * len(index))
                # one generator per group: its images do not depend on the chunking
                gens = [torch.Generator().manual_seed(self._key(step, first_index, i)) for i in groups]
                noise = pack_latents(torch.cat([torch.randn(g.group_size, LATENT_CHANNELS, h, w, generator=x)
                                                for x in gens]))
                traj = sde_sample(lambda x, s: self.velocity(model, x, s, txt, mask, neg, neg_mask, shapes).cpu(),
                                  noise, g.sde_steps, noise.shape[1], a=g.a, t_max=g.t_max, generator=gens)
                chunk = Chunk(prompts, traj, txt, mask, neg, neg_mask)
                flops += g.sde_steps * self.velocity_flops(len(index), shapes, txt, neg, backward=False)
                if scorer:
                    submitted_at = submitted_at or time.perf_counter()
                    chunk.scoring = self.reward.submit(unpack_latents(traj.sample, h, w),
                                                       [self.prompts[i] for i in index])
                    chunk.scoring.add_done_callback(lambda _f, c=chunk: setattr(c, "scored_at", time.perf_counter()))
                chunks.append(chunk)
        finally:
            model.train(was_training)
        return Rollout(step, chunks, steps, shapes, chunks[0].trajectory.times, time.perf_counter() - started,
                       flops, submitted_at)

    def rewards_of(self, rollout: Rollout, chunk: Chunk) -> torch.Tensor:
        """The chunk's rewards [groups, G]: TP rank 0 waits for them, then broadcasts them."""
        if chunk.rewards is None:
            n = len(chunk.prompts) * self.g.group_size
            rewards = None
            if chunk.scoring is not None:
                rewards = torch.as_tensor(chunk.scoring.result(), dtype=torch.float32).reshape(-1)
                if rewards.numel() != n:
                    raise ValueError(f"the reward gave {rewards.numel()} scores for {n} images")
                chunk.scoring = None
            group = tp_group() if dist.is_initialized() else None
            if group is not None and dist.get_world_size(group) > 1:
                buf = rewards.to(self.plan.device) if rewards is not None else \
                    torch.empty(n, dtype=torch.float32, device=self.plan.device)
                dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
                rewards = buf.cpu()
            chunk.rewards = rewards.view(len(chunk.prompts), self.g.group_size)
        return chunk.rewards

    def rollout_for(self, model, step: int, first_index: int) -> Rollout:
        """The rollout this step trains on: made now at the first step of a cycle of
        updates_per_rollout, else the one made then (kept, or loaded from the checkpoint)."""
        rollout_step = step - step % self.g.updates_per_rollout
        cached = self._rollouts.get(first_index)
        if cached is None or cached.step != rollout_step:
            self._rollouts.pop(first_index, None)  # free the old rollout before sampling a new one
            cached = self._rollouts[first_index] = self.rollout(model, rollout_step, first_index)
        return cached

    # ---- update

    def pieces(self, model, step: int, first_index: int, figures: dict) -> Iterator[tuple[Callable, bool]]:
        """The loss of this micro-batch in pieces of at most update_micro_batch transitions: (a
        function that runs the piece's forward and returns its loss, a scalar with its graph;
        whether it is the last piece). The pieces' losses sum to the loss. `figures` is filled once
        the consumer asks past the last piece."""
        g = self.g
        if g.kl_beta and self.reference is None:
            raise RuntimeError("GrpoObjective.setup() builds the reference model; call it first")
        rollout = self.rollout_for(model, step, first_index)
        fresh, rollout.reported = not rollout.reported, True
        steps, k = rollout.steps, rollout.steps.numel()
        planned = g.prompts_per_step * g.group_size * k
        times = torch.tensor(rollout.times, dtype=torch.float32)
        sums: dict[str, float] = {}
        trained, wait_s, dropped, skipped, advantages, all_rewards = 0, 0.0, 0, 0, [], []
        flops = rollout.model_flops if fresh else 0
        last_chunk = len(rollout.chunks) - 1
        update_started = time.perf_counter()
        for c, chunk in enumerate(rollout.chunks):
            waiting = time.perf_counter()
            rewards = self.rewards_of(rollout, chunk)
            wait_s += time.perf_counter() - waiting
            all_rewards.append(rewards.reshape(-1))
            kept, lost, skip = group_survivors(rewards)
            dropped, skipped = dropped + lost, skipped + skip
            if kept:
                samples = torch.cat(kept)
                adv = torch.cat([group_advantages(rewards.reshape(-1)[s][None])[0] for s in kept])
                advantages.append(adv)
                weight = 1.0 / planned
            elif c == last_chunk:
                # nothing to learn in the last chunk: one zero-weighted transition still carries the
                # step's last backward (every rank does one, and with it the DP gradient all-reduce)
                samples, adv, weight = torch.zeros(1, dtype=torch.long), torch.zeros(1), 0.0
            else:
                continue
            # this chunk's transitions, step-major: (trained step, sample)
            step_of = steps.repeat_interleave(samples.numel())
            sample_of, adv_of = samples.repeat(k), adv.repeat(k)
            size = g.update_micro_batch or step_of.numel()
            for lo in range(0, step_of.numel(), size):
                part = slice(lo, lo + size)
                n = step_of[part].numel()
                counted = n if weight else 0
                trained += counted
                flops += self.velocity_flops(n, rollout.shapes, chunk.txt, chunk.neg, backward=True)
                if self.reference is not None:
                    flops += self.velocity_flops(n, rollout.shapes, chunk.txt, chunk.neg, backward=False)

                def forward(chunk=chunk, part=part, n=n, counted=counted, weight=weight, adv_of=adv_of,
                            sample_of=sample_of, step_of=step_of):
                    loss, figs = self._piece_loss(model, rollout, chunk, times, step_of[part], sample_of[part],
                                                  adv_of[part])
                    for name, value in figs.items():
                        sums[name] = sums.get(name, 0.0) + float(value) * counted
                    return loss * (weight * n)  # the piece's mean times its share of the planned transitions

                yield forward, c == last_chunk and lo + size >= step_of.numel()
        update_s = time.perf_counter() - update_started - wait_s
        flat = torch.cat(all_rewards)
        finite = flat[torch.isfinite(flat)]
        adv = torch.cat(advantages) if advantages else torch.zeros(1)
        nan = torch.tensor(float("nan"))
        figures.update({name: torch.tensor(total / trained if trained else 0.0) for name, total in sums.items()})
        figures.setdefault("kl", torch.zeros(()))
        figures.update({
            "reward_mean": finite.mean() if finite.numel() else nan,
            "reward_std": finite.std(correction=0) if finite.numel() else nan,
            "advantage_abs_mean": adv.abs().mean(),
            "advantage_max": adv.max(), "advantage_min": adv.min(),
            "dropped_samples": torch.tensor(float(dropped)), "skipped_groups": torch.tensor(float(skipped)),
            "trained_transitions": torch.tensor(float(trained)),
            "rollout_s": torch.tensor(rollout.rollout_s if fresh else 0.0),
            "reward_wait_s": torch.tensor(wait_s), "update_s": torch.tensor(update_s),
            "reward_s": torch.tensor(max((c.scored_at - rollout.submitted_at for c in rollout.chunks), default=0.0)
                                     if fresh and rollout.submitted_at else 0.0),
            "images": torch.tensor(float(flat.numel() if fresh else 0)),
            # the step's work, for the trainer's samples/s, tokens/s, TFLOP/s and MFU (popped there)
            "model_flops": torch.tensor(float(flops)),
            "image_tokens": torch.tensor(float(flat.numel() * math.prod(rollout.shapes[0]) if fresh else 0)),
            "reward_retries": torch.tensor(float(getattr(self._reward, "retries", 0))),
        })

    def _piece_loss(self, model, rollout: Rollout, chunk: Chunk, times, step_of, samples, adv):
        """The clipped objective (mean) over transitions (step_of[j], samples[j]) of `chunk`."""
        g, dev = self.g, self.plan.device  # the rollout is kept on the CPU; the update runs where the model does
        states = chunk.trajectory.states
        x, x_next = states[step_of, samples].to(dev), states[step_of + 1, samples].to(dev)
        t, t_next = times[step_of].to(dev), times[step_of + 1].to(dev)
        old = chunk.trajectory.log_probs[step_of, samples].to(dev)

        def take(v):
            return None if v is None else v[samples]

        txt, mask, neg, neg_mask = take(chunk.txt), take(chunk.mask), take(chunk.neg), take(chunk.neg_mask)
        v = self.velocity(model, x, t, txt, mask, neg, neg_mask, rollout.shapes)
        log_prob = sde_log_prob(x, x_next, v, t, t_next, a=g.a, t_max=g.t_max)
        kl = None
        if self.reference is not None:
            with torch.no_grad():
                v_ref = self.velocity(self.reference, x, t, txt, mask, neg, neg_mask, rollout.shapes)
            kl = sde_step_kl(v, v_ref, t, t_next, a=g.a, t_max=g.t_max)
        return grpo_loss(log_prob, old, adv.to(dev), g.clip_range, kl, g.kl_beta)

    def loss(self, model, batch: dict, step: int, first_index: int) -> tuple[torch.Tensor, dict]:
        """The whole micro-batch's loss with one graph (tests; the trainer uses `forward_backward`)."""
        figures: dict = {}
        loss = sum(forward() for forward, _ in self.pieces(model, step, first_index, figures))
        return loss, figures

    def forward_backward(self, backend, batch: dict, step: int, first_index: int, scale: float,
                         sync: bool) -> tuple[torch.Tensor, dict]:
        """The trainer's micro-step: forward and backward piece by piece, so at most
        update_micro_batch transitions hold activations at once. Only the last piece of the step's
        last micro-batch (`sync`) runs the DP gradient all-reduce."""
        figures: dict = {}
        total = torch.zeros((), device=self.plan.device)
        for forward, last in self.pieces(backend.model, step, first_index, figures):
            with contextlib.nullcontext() if sync and last else backend.no_sync():  # DDP: forward too
                piece = forward()
                (piece * scale).backward()
            total = total + piece.detach().float()
        return total, figures

    # ---- checkpoint: a rollout still to be trained on

    def state_dict(self, step: int) -> dict[str, torch.Tensor]:
        """The rollouts the optimizer steps from `step` on still train on (empty at a cycle's end)."""
        out: dict[str, torch.Tensor] = {}
        for first_index, r in sorted(self._rollouts.items()):
            if step - step % self.g.updates_per_rollout != r.step or step % self.g.updates_per_rollout == 0:
                continue
            pre = f"{first_index}."
            out[pre + "meta"] = torch.tensor([r.step, len(r.chunks)], dtype=torch.int64)
            out[pre + "steps"] = r.steps
            out[pre + "times"] = torch.tensor(r.times, dtype=torch.float64)
            for c, chunk in enumerate(r.chunks):
                if chunk.rewards is None:
                    raise RuntimeError("a checkpointed rollout must have its rewards")
                cp = f"{pre}{c}."
                out[cp + "prompts"] = torch.tensor(chunk.prompts, dtype=torch.int64)
                out[cp + "states"] = chunk.trajectory.states
                out[cp + "log_probs"] = chunk.trajectory.log_probs
                out[cp + "txt"] = chunk.txt
                out[cp + "rewards"] = chunk.rewards
                for name in ("mask", "neg", "neg_mask"):
                    if getattr(chunk, name) is not None:
                        out[cp + name] = getattr(chunk, name)
        return {k: v.contiguous() for k, v in out.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        h, w = self.g.height // 8, self.g.width // 8
        self._rollouts.clear()
        for key in sorted(k for k in state if k.endswith(".meta")):
            pre = key[:-len("meta")]
            rollout_step, n = state[key].tolist()
            chunks = []
            for c in range(n):
                cp = f"{pre}{c}."
                traj = Trajectory(state[cp + "states"], state[pre + "times"].tolist(), state[cp + "log_probs"])
                chunks.append(Chunk(state[cp + "prompts"].tolist(), traj, state[cp + "txt"], state.get(cp + "mask"),
                                    state.get(cp + "neg"), state.get(cp + "neg_mask"), rewards=state[cp + "rewards"]))
            self._rollouts[int(pre[:-1])] = Rollout(rollout_step, chunks, state[pre + "steps"], [packed_shape(h, w)],
                                                    state[pre + "times"].tolist(), 0.0, 0, reported=True)
