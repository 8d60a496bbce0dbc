"""The objective slot: what a training step minimizes (`train.objective`).

The trainer's step asks its objective for the loss of a micro-batch and does the backward; it
knows nothing of noise levels, targets or reference models. `flow` is flow matching, for
pre-training and SFT. Post-training objectives plug in here, the loop unchanged, through the
three parts of the interface:
- `from_config(cfg, plan)`: the objective's own settings, and the plan (device, dtypes, autocast);
- `setup(parallelized)`, once the trained model is built: DPO and GRPO build their frozen
  reference model here, at the same TP (`parallelize(..., optimizer=None)`, then frozen);
- `loss(model, batch, step, first_index) -> (loss, figures)`: extra batch fields (DPO's
  preferred and rejected images, GRPO's rollouts and rewards) come in `batch`; figures beyond
  the loss (DPO's reward margin and accuracy, GRPO's KL) go out as detached scalars, which the
  trainer averages over micro-batches and DP ranks into metrics.jsonl (`"objective": {...}`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mmdit.cache.segment import PAIR
from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.config.train import TrainConfig
from mmdit.consumer.batch import StepInputs
from mmdit.consumer.dpo import DpoObjective
from mmdit.consumer.grpo_objective import GrpoObjective
from mmdit.model.flow import flow_matching_loss, noisy_input, sample_training_sigmas, velocity_target
from mmdit.parallel.parallelize import Parallelized, Plan


class Objective(Protocol):
    name: str

    @classmethod
    def from_config(cls, cfg: JobConfig, plan: Plan) -> Objective: ...

    def setup(self, parallelized: Parallelized) -> None:
        """Once, after the trained model is built and before a resume loads its state."""

    def loss(self, model, batch: dict, step: int, first_index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: its mean loss (a scalar with a graph to the model's parameters) and
        figures to record (detached scalars). `model` is what the step calls, wrapped for data
        parallelism; `first_index` is the micro-batch's first sample in the step's global batch."""


def sample_noise(train: TrainConfig, seed: int, step: int, first_index: int, x0: torch.Tensor):
    """Noise level and noise of each sample, drawn from a generator keyed by (seed, step, the
    sample's index in the global batch): the same whatever the DP size or micro-batch split."""
    sigmas, noise = [], []
    for i in range(x0.shape[0]):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + first_index + i)
        sigmas.append(sample_training_sigmas(
            1, sampling=train.sigma_sampling, logit_mean=train.logit_mean, logit_std=train.logit_std,
            image_seq_len=x0.shape[1] if train.shift_sigmas else None, generator=g))
        noise.append(torch.randn(x0.shape[1:], generator=g))
    return torch.cat(sigmas).to(x0.device), torch.stack(noise).to(x0.device)


class FlowObjective:
    """Flow matching (model/flow.py): x_s = (1 - s) x0 + s noise, predict noise - x0, MSE over the
    target image's tokens (condition-image tokens are inputs, not predictions)."""

    name = "flow"

    def __init__(self, train: TrainConfig, seed: int, plan: Plan):
        self.train, self.seed, self.plan = train, seed, plan

    @classmethod
    def from_config(cls, cfg: JobConfig, plan: Plan) -> FlowObjective:
        return cls(cfg.train, cfg.seed, plan)

    def setup(self, parallelized: Parallelized) -> None:
        pass  # the trained model is all flow matching needs

    def loss(self, model, batch: dict, step: int, first_index: int) -> tuple[torch.Tensor, dict]:
        plan = self.plan
        if PAIR in (batch.get("task") or ()):
            raise ValueError(f"train.objective=flow got preference pairs (task {PAIR!r}): train them with "
                             "train.objective=dpo, or leave them out with data.task_weights.pair=0")
        inputs = StepInputs.from_batch(batch, plan.device, plan.compute_dtype)
        x0 = inputs.x0
        sigmas, noise = sample_noise(self.train, self.seed, step, first_index, x0)
        x_s = noisy_input(x0, noise, sigmas).to(plan.compute_dtype)
        tokens = x_s if inputs.cond_tokens is None else torch.cat([x_s, inputs.cond_tokens], dim=1)
        with torch.autocast(plan.device.type, dtype=plan.compute_dtype, enabled=plan.autocast):
            pred = model(tokens, inputs.txt, inputs.txt_mask, sigmas, inputs.image_shapes)
        return flow_matching_loss(pred[:, :x0.shape[1]].float(), velocity_target(x0, noise)), {}


BY_NAME: dict[str, type] = {"flow": FlowObjective, "dpo": DpoObjective, "grpo": GrpoObjective}
"""`train.objective` -> its class (config/train.py OBJECTIVES lists the same names)."""


def build_objective(cfg: JobConfig, plan: Plan) -> Objective:
    if cfg.train.objective not in BY_NAME:
        raise ConfigError(f"invalid config: train.objective={cfg.train.objective!r} has no implementation "
                          f"(consumer/objectives.py has {sorted(BY_NAME)})")
    return BY_NAME[cfg.train.objective].from_config(cfg, plan)
