"""Random latent batches with the data service's batch layout: the model-only demo and benchmarks.

Samples come from a fixed pool of `train.random_pool_size` random latents + prompt embeddings,
cycled in order, so a short demo can show the loss falling as the model fits them. With
train.objective=dpo each sample is a preference pair (a second random latent as the rejected image). Everything is
a function of (seed, step, dp_rank): a resumed run sees the batches it would have seen.
"""

import torch

from mmdit.config.model import MMDiTArgs
from mmdit.config.train import TrainConfig


def random_sample(args: MMDiTArgs, train: TrainConfig, seed: int, index: int) -> dict:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    text_len = train.random_text_len
    length = int(torch.randint(max(1, text_len // 2), text_len + 1, (1,), generator=g))
    mask = torch.arange(text_len) < length
    shape = (args.latent_channels, train.random_height // 8, train.random_width // 8)
    sample = {
        "latents": torch.randn(*shape, generator=g),
        "prompt_embeds": torch.randn(text_len, args.joint_attention_dim, generator=g) * mask[:, None],
        "prompt_mask": mask,
        "key": f"random-{index:06d}",
    }
    if train.objective == "dpo":  # a preference pair: the rejected image's latents beside the preferred
        sample["cond_latents"] = torch.randn(*shape, generator=g)
    return sample


def random_batch(args: MMDiTArgs, train: TrainConfig, seed: int, step: int, dp_rank: int, dp_size: int) -> dict:
    """Micro-batch round `step` (optimizer step x accumulation + micro-batch) of DP rank `dp_rank`:
    samples are numbered across ranks and rounds, so any split of a global batch sees the same."""
    b = train.micro_batch_size
    first = (step * dp_size + dp_rank) * b
    samples = [random_sample(args, train, seed, (first + i) % train.random_pool_size) for i in range(b)]
    return {
        "latents": torch.stack([s["latents"] for s in samples]),
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
        "prompt_mask": torch.stack([s["prompt_mask"] for s in samples]),
        **({"cond_latents": torch.stack([s["cond_latents"] for s in samples])} if "cond_latents" in samples[0] else {}),
        "task": ["pair" if "cond_latents" in samples[0] else "t2i"] * b,
        "keys": [s["key"] for s in samples],
        "batch_id": f"random-{step}-{dp_rank}",
        "config_version": 0,
    }


class RandomBatches:
    def __init__(self, args: MMDiTArgs, train: TrainConfig, seed: int, dp_rank: int, dp_size: int,
                 start_step: int = 0):
        self.args, self.train, self.seed = args, train, seed
        self.dp_rank, self.dp_size, self.step = dp_rank, dp_size, start_step

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = random_batch(self.args, self.train, self.seed, self.step, self.dp_rank, self.dp_size)
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"step": self.step}
