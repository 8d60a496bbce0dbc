"""Evaluation during training: loss on held-out samples at fixed noise levels.

Held out: the samples whose key hashes below `data.eval_fraction` (dataservice/plan.py
`held_out`): the plan never draws them, so training never sees them, and both sides agree on
the split without a word exchanged. The evaluator reads them from the latent cache (shared
storage, as producers write it); with random data, it draws samples past the training pool.

Every sample is scored at `eval.sigmas` stratified noise levels (k + 0.5) / K, with noise
seeded by the sample's key: the same loss whatever the run, TP or DP layout (DP ranks score
shares of the samples and add up), on the trainer ranks or in the evaluator process alike. A record `{"step", "eval": true, "eval_loss",
"eval_loss_per_sigma", "eval_samples"}` goes to metrics.jsonl.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from mmdit.model.flow import flow_matching_loss, noisy_input, velocity_target


def _seed(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


class HeldOutLoss:
    """The held-out samples and noise levels; `run(model, plan)` scores a model on them."""

    def __init__(self, samples: list[dict], num_sigmas: int, dp_rank: int, dp_size: int, dp_group):
        self.sigmas = [(k + 0.5) / num_sigmas for k in range(num_sigmas)]
        self.samples = samples  # every rank holds the list; each scores its share
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    @torch.no_grad()
    def run(self, model, plan) -> dict:
        """Score this rank's share with `model` as `plan` (parallel/parallelize.py) runs it."""
        from mmdit.consumer.batch import StepInputs

        device, dtype = plan.device, plan.compute_dtype
        totals = torch.zeros(len(self.sigmas) + 1, dtype=torch.float64)  # per-sigma sums, then a count
        model.eval()
        for sample in self.samples[self.dp_rank::self.dp_size]:
            batch = {k: v.unsqueeze(0) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
            inputs = StepInputs.from_batch(batch, device, dtype)
            x0, n = inputs.x0, inputs.x0.shape[1]
            g = torch.Generator().manual_seed(_seed(sample["key"]))
            noise = torch.randn(x0.shape[1:], generator=g).unsqueeze(0).to(device)
            for k, s in enumerate(self.sigmas):
                sigma = torch.full((1,), s, dtype=torch.float32, device=device)
                x_s = noisy_input(x0, noise, sigma).to(dtype)
                tokens = x_s if inputs.cond_tokens is None else torch.cat([x_s, inputs.cond_tokens], dim=1)
                with torch.autocast(device.type, dtype=dtype, enabled=plan.autocast):
                    pred = model(tokens, inputs.txt, inputs.txt_mask, sigma, inputs.image_shapes)
                totals[k] += float(flow_matching_loss(pred[:, :n].float(), velocity_target(x0, noise)))
            totals[-1] += 1
        model.train()
        if self.dp_size > 1:
            dist.all_reduce(totals, group=self.dp_group)
        count = max(1.0, float(totals[-1]))
        per_sigma = [float(t) / count for t in totals[:-1]]
        return {"eval": True, "eval_loss": sum(per_sigma) / len(per_sigma), "eval_loss_per_sigma": per_sigma,
                "eval_sigmas": self.sigmas, "eval_samples": int(totals[-1])}


def held_out_records(cache_dir: str, fingerprint_hint: str, fraction: float, limit: int) -> list[dict]:
    """Up to `limit` held-out records of the cache, in key order, as single-sample batches."""
    from mmdit.cache import LatentCache
    from mmdit.dataservice.plan import held_out
    from mmdit.dataservice.selection import resolve_fingerprint

    cache = LatentCache(cache_dir)
    fp = resolve_fingerprint(cache, fingerprint_hint)
    keys = sorted(k for k in cache.keys(fp) if held_out(k, fraction))[:limit]
    found, _ = cache.read_available(keys, fp)
    out = []
    for key in keys:
        if key in found:
            rec = found[key]
            sample = {"key": key, "latents": rec["latents"].clone(), "prompt_embeds": rec["prompt_embeds"].clone(),
                      "prompt_mask": torch.ones(rec["prompt_embeds"].shape[0], dtype=torch.bool)}
            if rec.get("cond_latents") is not None:
                sample["cond_latents"] = rec["cond_latents"].clone()
            out.append(sample)
    cache.close()
    return out


def random_held_out(args, train, seed: int, limit: int) -> list[dict]:
    """Random samples past the training pool (random data has no cache)."""
    from mmdit.consumer.random_data import random_sample

    out = []
    for i in range(limit):
        s = random_sample(args, train, seed, train.random_pool_size + i)
        out.append({"key": s["key"], "latents": s["latents"], "prompt_embeds": s["prompt_embeds"],
                    "prompt_mask": s["prompt_mask"]})
    return out
