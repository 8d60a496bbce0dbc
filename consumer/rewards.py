"""GRPO's reward slot (`train.grpo.reward`): final latents and their prompts in, one score each out.

A reward is a callable `reward(latents, prompts) -> [B] float32`, where `latents` are the
rollout's final normalized latents [B, 16, h, w] (float32, CPU) and `prompts` the B prompts
(consumer/text_eval/prompts.py `TextPrompt`: prompt, target_texts). A sample the reward cannot
score gets NaN: GRPO drops it from its group (consumer/grpo_objective.py).

- `ocr`: decode with the VAE of encoders.dir, read the image with RapidOCR (consumer/text_eval/
  ocr.py) and score the reading's word accuracy against the prompt's target_texts, as `mmdit
  eval` does (consumer/text_eval/scoring.py).
- `alignment`: decode as `ocr` does and score each image against its prompt with a local CLIP or
  SigLIP model (`train.grpo.alignment_model`): cosine similarity in [-1, 1], `mmdit eval`'s
  alignment figure (consumer/alignment_reward.py).
- `latent_target`: -mean((latents - target)^2), a cheap toy that tests learning without a VAE.
- `package.module:function`: a user's own, called as above; whatever it returns becomes B floats.

Rewards run for TP rank 0 of each group, which broadcasts them to its TP group; each rollout
chunk is submitted as soon as it is sampled (`submit`), and scored while the next one samples: on
a thread of the trainer process, or with `train.grpo.reward_workers` = N in N local worker
processes (`RewardWorkers`) that split the images. A worker that dies mid-request (its pool
breaks) costs one retry of the whole request on a fresh pool, never a lost or double-counted
sample; a second failure makes the request's rewards NaN. With `train.grpo.reward_service` the
workers are `mmdit reward-worker` processes on any host of the data service's RPC group
(consumer/reward_service.py `RemoteRewards`), scoring while the next rollout runs.

Every reward here also has `submit(latents, prompts) -> Future` (consumer/reward_base.py `Submits`: on one
background thread), the interface RemoteRewards has, so a caller can go on while it scores.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from mmdit.consumer.reward_base import Reward, Submits, decode_latents, to_image

log = logging.getLogger("mmdit.grpo")


class LatentTarget(Submits):
    """-mean((latents - target)^2) per image: highest when every latent element equals `target`."""

    def __init__(self, target: float):
        self.target = target

    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        return -(latents.float() - self.target).square().mean(dim=tuple(range(1, latents.dim())))


class OcrReward(Submits):
    """OCR word accuracy of the decoded image against the prompt's target_texts, in [0, 1]."""

    def __init__(self, encoders, threads: int = 0, engine=None):
        from mmdit.consumer.text_eval.ocr import OcrEngine

        self.encoders = encoders
        self.engine = engine or OcrEngine(threads)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        from mmdit.consumer.text_eval.scoring import score_reading

        enc = self.encoders
        pixels = decode_latents(enc.vae, latents, enc.device, enc.dtype)
        scores = []
        for image, prompt in zip(pixels, prompts):
            try:
                reading = self.engine.read(to_image(image))
                scores.append(score_reading(prompt.target_texts, reading.lines)["word_accuracy"])
            except Exception as e:  # one unreadable image costs its sample, not the step
                log.warning("ocr reward failed for prompt %r: %s", prompt.prompt, e)
                scores.append(float("nan"))
        return torch.tensor(scores, dtype=torch.float32)


class EntryPoint(Submits):
    """A user's reward `package.module:function`; an exception makes the whole batch NaN."""

    def __init__(self, spec: str):
        module, _, name = spec.partition(":")
        self.spec, self.fn = spec, getattr(importlib.import_module(module), name)

    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        try:
            out = torch.as_tensor(self.fn(latents, prompts), dtype=torch.float32).reshape(-1)
        except Exception as e:
            log.warning("reward %s failed: %s", self.spec, e)
            return torch.full((latents.shape[0],), float("nan"))
        if out.shape[0] != latents.shape[0]:
            raise ValueError(f"reward {self.spec} returned {out.shape[0]} scores for {latents.shape[0]} images")
        return out


def build_reward(grpo, encoders_loader: Callable[[], object]) -> Reward:
    """`train.grpo.reward` -> the callable; `encoders_loader()` gives the Encoders (only ocr and alignment load them)."""
    if grpo.reward == "latent_target":
        return LatentTarget(grpo.latent_target)
    if grpo.reward == "ocr":
        return OcrReward(encoders_loader(), grpo.ocr_threads)
    if grpo.reward == "alignment":
        from mmdit.consumer.alignment_reward import AlignmentReward

        return AlignmentReward(encoders_loader(), grpo.alignment_model)
    return EntryPoint(grpo.reward)


_worker_reward: Reward | None = None


def _start_worker(grpo, encoders_cfg) -> None:
    global _worker_reward
    torch.set_num_threads(1)

    def encoders():
        from mmdit.producer.encoders import Encoders

        return Encoders.load(encoders_cfg)

    _worker_reward = build_reward(grpo, encoders)


def _score(latents: torch.Tensor, prompts: list) -> torch.Tensor:
    return _worker_reward(latents, prompts).float()


class RewardWorkers(Submits):
    """The reward in `workers` spawned processes (each builds it once); the images are split
    between them. The pool starts on the first call, so only the ranks that score start one."""

    def __init__(self, grpo, encoders_cfg, workers: int):
        self.grpo, self.encoders_cfg, self.workers = grpo, encoders_cfg, workers
        self.pool: ProcessPoolExecutor | None = None
        self.retries = 0

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.grpo, self.encoders_cfg))
        return self.pool

    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        chunks = [c for c in torch.arange(latents.shape[0]).chunk(self.workers) if c.numel()]
        for attempt in range(2):
            try:
                pool = self._pool()
                futures = [pool.submit(_score, latents[c].clone(), [prompts[i] for i in c.tolist()]) for c in chunks]
                return torch.cat([f.result() for f in futures])
            except BrokenProcessPool as e:  # a worker died: every result of this request is discarded
                log.warning("a reward worker died (%s); %s", e, "retrying on a fresh pool" if attempt == 0 else
                            "the request's samples are dropped")
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
                self.retries += 1
        return torch.full((latents.shape[0],), float("nan"))

    def close(self) -> None:
        super().close()
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
