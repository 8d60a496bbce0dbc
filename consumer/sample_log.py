"""run.dir/samples.jsonl: which samples every step trained on (`train.log_samples=true`).

One line per step and logging rank, written by `mmdit train` (TP rank 0 of each DP rank) and
`mmdit consume` (every rank, so the TP broadcast can be checked) alike:

    {"step": 1, "dp_rank": 0, "tp_rank": 0, "seq": 0, "batch_id": [epoch, index], "keys": [...],
     "config_version": 0, "producer": "producer_host_123_0", "shape": [B, 16, h, w],
     "cond_shape": null, "digest": "...", "time": 1764500000.123}

`step` counts optimizer steps from 1, as metrics.jsonl does: line `step: N` is the batch of the
step that metrics.jsonl reports as `step: N`. `seq` is the batch's position in the data plan,
`digest` a hash of the batch's tensors (equal on every TP rank of a DP rank). Each line is one
O_APPEND write, so lines of several ranks never interleave.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from mmdit.utils.jsonl import read_jsonl

SAMPLES = "samples.jsonl"


def batch_digest(batch: dict) -> str:
    """Hash of every tensor of a batch (names, shapes, dtypes, bytes)."""
    h = hashlib.sha1()
    for name in sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor)):
        t = batch[name].contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class SampleLog:
    def __init__(self, run_dir: str | os.PathLike, dp_rank: int, tp_rank: int):
        self.path = Path(run_dir) / SAMPLES
        self.dp_rank, self.tp_rank = dp_rank, tp_rank

    def write(self, step: int, batch: dict) -> None:
        cond, batch_id = batch.get("cond_latents"), batch["batch_id"]
        record = {
            "step": step, "dp_rank": self.dp_rank, "tp_rank": self.tp_rank, "seq": batch.get("seq"),
            "batch_id": list(batch_id) if isinstance(batch_id, (tuple, list)) else batch_id, "keys": list(batch["keys"]),
            "config_version": int(batch.get("config_version", 0)), "producer": batch.get("producer"),
            "shape": list(batch["latents"].shape), "cond_shape": list(cond.shape) if cond is not None else None,
            "digest": batch_digest(batch), "time": round(time.time(), 3),
        }
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def read_samples(run_dir: str | os.PathLike) -> list[dict]:
    return read_jsonl(Path(run_dir) / SAMPLES)
