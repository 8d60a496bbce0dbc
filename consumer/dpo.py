"""Diffusion-DPO for flow matching (`train.objective=dpo`; Qwen-Image report Eq. 3).

For a prompt with a preferred image w and a rejected image l, one noise level s ~ U(0, 1) and one
noise draw serve both images; the velocity error of each, err = mean ||v(x_s) - (noise - x0)||^2
over its elements, is taken under the trained policy and under a frozen reference, and

    margin = -beta * ((err_w - err_l)_policy - (err_w - err_l)_reference)
    loss   = -log sigmoid(margin)

`margin` is the implicit reward margin (the reward of an image is -beta times how much better
the policy denoises it than the reference); the figures are its mean and the preference accuracy,
the fraction of pairs with a positive margin. At the start the policy is the reference: every
margin is 0 and the loss is log 2.

Data: a pair record (cache/segment.py, task "pair") holds the preferred image's latents in
`latents` and the rejected image's in `cond_latents`, in one bucket, with the prompt encoded
once; `PairInputs` unpacks such a batch into `x0_win` and `x0_lose`.

The reference is built once by `build_reference`, at the trained model's TP (and sequence
parallelism), in the compute dtype (bf16 on GPU), without gradients or optimizer state, from
`checkpoint.init_from`, or from the same initial weights as the policy (same seed) without one.
With LoRA (train.lora) there is no second model: the reference is the policy with its adapters
switched off (`BaseOfPolicy`), which is exactly the frozen base the adapters were added to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmdit.cache.segment import PAIR
from mmdit.config.job import JobConfig
from mmdit.model.flow import noisy_input, sample_training_sigmas, velocity_target
from mmdit.model.lora import disabled
from mmdit.model.mmdit import pack_latents, packed_shape
from mmdit.parallel.parallelize import Parallelized, Plan, parallelize


@dataclass
class PairInputs:
    """A batch of preference pairs as the model takes it: both images packed, the prompt once."""

    x0_win: torch.Tensor  # [B, N, C*4] packed latents of the preferred image, fp32
    x0_lose: torch.Tensor  # [B, N, C*4] packed latents of the rejected image, fp32
    txt: torch.Tensor  # [B, L, D] prompt embeddings, compute dtype
    txt_mask: torch.Tensor | None  # [B, L] bool; None when nothing is padded
    image_shapes: list  # [(frames, rows, cols)] of the target

    @classmethod
    def from_batch(cls, batch: dict, device, dtype) -> PairInputs:
        tasks = set(batch.get("task") or [PAIR])
        if tasks != {PAIR} or batch.get("cond_latents") is None:
            raise ValueError(f"train.objective=dpo needs preference pairs (task {PAIR!r}: the preferred image's "
                             f"latents and the rejected one's as cond_latents), got tasks {sorted(tasks)}; weigh "
                             f"the data with data.task_weights (conf/data/dpo.yaml)")
        win, lose, mask = batch["latents"], batch["cond_latents"], batch["prompt_mask"]
        if win.shape != lose.shape:
            raise ValueError(f"a pair's images must share a bucket: {tuple(win.shape)} vs {tuple(lose.shape)}")
        length = int(mask.sum(dim=1).max()) if mask.numel() else 0  # padding cut, as StepInputs does
        mask, embeds = mask[:, :length], batch["prompt_embeds"][:, :length]
        return cls(x0_win=pack_latents(win.to(device)).float(), x0_lose=pack_latents(lose.to(device)).float(),
                   txt=embeds.to(device, dtype), txt_mask=None if bool(mask.all()) else mask.to(device),
                   image_shapes=[packed_shape(*win.shape[-2:])])


def dpo_loss(err_policy_w: torch.Tensor, err_policy_l: torch.Tensor, err_ref_w: torch.Tensor,
             err_ref_l: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair errors [B] -> (mean loss, margins [B]) of Eq. 3."""
    margin = -beta * ((err_policy_w - err_policy_l) - (err_ref_w - err_ref_l))
    return -F.logsigmoid(margin).mean(), margin


def build_reference(cfg: JobConfig, plan: Plan) -> torch.nn.Module:
    """The frozen reference model: `checkpoint.init_from` (else the policy's initial weights, by
    the same seed) at the trained model's TP, in the compute dtype, no gradients, no optimizer.

    The one place the reference is made: with LoRA (train.lora), the reference is the base model
    without adapters, which is what this builds from the same weights; an adapter-aware trainer
    could instead switch the policy's adapters off for the reference pass and skip this copy.
    """
    built = parallelize(cfg.model, cfg.parallel, dtype=cfg.train.dtype, optimizer=None, seed=cfg.seed,
                        weights=cfg.checkpoint.init_from or None, device=plan.device)
    model = built.model.eval()
    model.requires_grad_(False)
    return model


class BaseOfPolicy:
    """The reference of a LoRA policy: its own (unwrapped) model run with the adapters off."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, *args):
        with disabled(self.model):
            return self.model(*args)


def pair_noise(seed: int, step: int, first_index: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s ~ U(0, 1) (no resolution shift: the report's Eq. 3) and the noise [B, N, C] of each
    pair, from a generator keyed by (seed, step, the pair's index in the global batch), as flow's
    `sample_noise` keys them: the same whatever the DP size or micro-batch split."""
    sigmas, noise = [], []
    for i in range(x0.shape[0]):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + first_index + i)
        sigmas.append(sample_training_sigmas(1, sampling="uniform", generator=g))
        noise.append(torch.randn(x0.shape[1:], generator=g))
    return torch.cat(sigmas).to(x0.device), torch.stack(noise).to(x0.device)


class DpoObjective:
    """Diffusion-DPO (module docstring): one policy forward and one reference forward, each over
    the preferred and the rejected images of the micro-batch side by side (2B samples)."""

    name = "dpo"

    def __init__(self, cfg: JobConfig, plan: Plan, reference_builder=build_reference):
        self.cfg, self.plan, self.beta, self.seed = cfg, plan, cfg.train.dpo.beta, cfg.seed
        self.reference_builder = reference_builder
        self.reference: torch.nn.Module | BaseOfPolicy | None = None

    @classmethod
    def from_config(cls, cfg: JobConfig, plan: Plan) -> DpoObjective:
        return cls(cfg, plan)

    def setup(self, parallelized: Parallelized) -> None:
        if getattr(parallelized, "lora", False):  # tests pass no Parallelized
            self.reference = BaseOfPolicy(parallelized.model)
        else:
            self.reference = self.reference_builder(self.cfg, self.plan)

    def _errors(self, model, inputs: PairInputs, sigmas, noise) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pair velocity errors [B] of the preferred and the rejected image under `model`."""
        plan, b = self.plan, inputs.x0_win.shape[0]
        x0 = torch.cat([inputs.x0_win, inputs.x0_lose])
        noise2, sigmas2 = torch.cat([noise, noise]), torch.cat([sigmas, sigmas])
        x_s = noisy_input(x0, noise2, sigmas2).to(plan.compute_dtype)
        txt = torch.cat([inputs.txt, inputs.txt])
        mask = None if inputs.txt_mask is None else torch.cat([inputs.txt_mask, inputs.txt_mask])
        with torch.autocast(plan.device.type, dtype=plan.compute_dtype, enabled=plan.autocast):
            pred = model(x_s, txt, mask, sigmas2, inputs.image_shapes)
        err = (pred.float() - velocity_target(x0, noise2)).square().mean(dim=(1, 2))
        return err[:b], err[b:]

    def loss(self, model, batch: dict, step: int, first_index: int) -> tuple[torch.Tensor, dict]:
        if self.reference is None:
            raise RuntimeError("DpoObjective.setup() builds the reference model; call it first")
        inputs = PairInputs.from_batch(batch, self.plan.device, self.plan.compute_dtype)
        sigmas, noise = pair_noise(self.seed, step, first_index, inputs.x0_win)
        err_w, err_l = self._errors(model, inputs, sigmas, noise)
        with torch.no_grad():
            ref_w, ref_l = self._errors(self.reference, inputs, sigmas, noise)
        loss, margin = dpo_loss(err_w, err_l, ref_w, ref_l, self.beta)
        margin = margin.detach()
        return loss, {"reward_margin": margin.mean(), "preference_accuracy": (margin > 0).float().mean(),
                      "policy_err_win": err_w.detach().mean(), "policy_err_lose": err_l.detach().mean()}
