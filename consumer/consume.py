"""`mmdit consume`: a trainer stand-in that pulls batches from the data service, without a model.

It runs `train.steps` steps of `service.step_time_s` simulated compute on each of
`service.dp_size` x `parallel.tp` local ranks (TP rank 0 of each DP rank fetches, the TP group
receives over gloo), records how long every step waited for data, and with
`train.log_samples=true` appends one line per step and rank to run.dir/samples.jsonl
(consumer/sample_log.py).

Resume: each DP rank saves its steps and data state (consumer/checkpoint.py) at the end; with
checkpoint.resume=true (the default) a later run continues from it up to train.steps.
Summaries go to run.dir/consume-dp<r>-tp<t>.json (data_wait_fraction and wait statistics).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmdit.utils.processes import SignalStop, ignore_repeated_sigterm

log = logging.getLogger("mmdit.consume")


def check_shapes(batch: dict) -> None:
    """Every sample of a batch has its bucket's latent shape (one bucket per batch)."""
    h, w = batch["bucket"]
    want = (len(batch["keys"]), 16, h // 8, w // 8)
    if tuple(batch["latents"].shape) != want:
        raise AssertionError(f"batch {batch['batch_id']}: latents {tuple(batch['latents'].shape)} != {want}")
    if batch["prompt_embeds"].shape[:2] != batch["prompt_mask"].shape:
        raise AssertionError(f"batch {batch['batch_id']}: prompt_embeds and prompt_mask disagree")


def run_rank(cfg, dp_rank: int, tp_rank: int, group=None, src: int = 0) -> dict:
    from mmdit.config.service import ClientSettings
    from mmdit.consumer.checkpoint import read_data_state, write_data_state
    from mmdit.consumer.sample_log import SampleLog
    from mmdit.dataservice.client import ServiceClient, TPBroadcast, client_on_tp_rank0
    from mmdit.dataservice.protocol import expectation

    svc, train = cfg.service, cfg.train
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start, data_state = read_data_state(run_dir, dp_rank) if cfg.checkpoint.resume else (0, {})

    def make_client() -> ServiceClient:  # no model here: only the data keys must match the service
        return ServiceClient(svc.role(ClientSettings), dp_rank, svc.dp_size, train.micro_batch_size,
                             state=data_state, expect=expectation(cfg, model=False))

    if group is None:
        batches = make_client()
    else:
        batches = TPBroadcast(client_on_tp_rank0(make_client if tp_rank == 0 else None, group, src), group, src)
    sample_log = SampleLog(run_dir, dp_rank, tp_rank) if train.log_samples else None
    stop = _StopFlag(group)
    waits, times = [], []
    step = start
    try:
        while step < train.steps and not stop.agreed():
            begin = time.perf_counter()
            batch = next(batches)
            got = time.perf_counter()
            step += 1
            check_shapes(batch)
            if sample_log is not None:
                sample_log.write(step, batch)
            left = svc.step_time_s - (time.perf_counter() - got)
            if left > 0:
                time.sleep(left)
            waits.append(got - begin)
            times.append(time.perf_counter() - begin)
            batches.report({"step": step, "samples_per_second": len(batch["keys"]) * svc.dp_size / times[-1],
                            "data_wait_fraction": waits[-1] / times[-1], "config_version": batch["config_version"]})
        if tp_rank == 0:
            write_data_state(run_dir, dp_rank, step, batches.state())
    finally:
        stop.restore()
        batches.close()
    summary = {
        "dp_rank": dp_rank, "tp_rank": tp_rank, "start_step": start, "steps": len(times), "final_step": step,
        "stopped_early": step < train.steps,
        "data_wait_fraction": sum(waits) / sum(times) if times else 0.0,
        "data_wait_fraction_after_first": sum(waits[1:]) / sum(times[1:]) if len(times) > 1 else 0.0,
        "wait_mean_s": sum(waits) / len(waits) if waits else 0.0, "wait_max_s": max(waits, default=0.0),
        "first_wait_s": waits[0] if waits else 0.0, "step_time_s": svc.step_time_s,
        "batches_per_second": len(times) / sum(times) if times else 0.0,
        "waits_s": [round(w, 6) for w in waits], "step_times_s": [round(t, 6) for t in times],
    }
    (run_dir / f"consume-dp{dp_rank}-tp{tp_rank}.json").write_text(json.dumps(summary, indent=1))
    return summary


class _StopFlag(SignalStop):
    """SIGTERM/SIGINT ask to stop after the current step; ranks of a TP group agree on when."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def _handle(self, signum, frame) -> None:
        super()._handle(signum, frame)
        ignore_repeated_sigterm()  # a consumer rank starts no children: nothing interrupts its stop

    def agreed(self) -> bool:
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
