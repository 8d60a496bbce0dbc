"""`mmdit consume`: a trainer stand-in pulling batches from the data service (consumer/consume.py)."""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from mmdit.config import ConfigError
from mmdit.config.loader import load_config
from mmdit.consumer.consume import run_rank
from mmdit.launch.args import Command, parse

COMMAND = Command("consume", __doc__, sections=("service", "train", "checkpoint", "parallel", "data", "model", "run",
                                                "launch"))


def _brief(summary: dict) -> str:
    """The summary line printed on stdout (the per-step lists stay in the file)."""
    return json.dumps({k: v for k, v in summary.items() if not isinstance(v, list)})


def main(argv: list[str]) -> int:
    from mmdit.dataservice.address import reach
    from mmdit.launch.local import is_rank, main_or_launch

    cfg = load_config(parse(COMMAND, argv).overrides)
    svc, tp = cfg.service, cfg.parallel.tp
    if tp > 1 and svc.dp_rank >= 0:
        raise ConfigError("service.dp_rank selects one rank with parallel.tp=1 only; with TP, start all ranks")
    reach(svc, min(10.0, svc.join_timeout_s))
    code = main_or_launch("consume", argv, cfg, role="consumer", nproc=svc.dp_size * tp if svc.dp_rank < 0 else 1)
    if code is not None:
        return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    group, src = None, 0
    if is_rank():
        dp_rank, tp_rank = divmod(int(os.environ["RANK"]), tp)
    else:
        from mmdit.utils.processes import ProcessTable

        dp_rank, tp_rank = max(svc.dp_rank, 0), 0
        ProcessTable(cfg.run.dir).add("consumer", f"consumer_rank{dp_rank * tp}", os.getpid())
    if tp > 1:
        from mmdit.dataservice.client import tp_gloo_group
        from mmdit.utils.store import join_process_group

        join_process_group("gloo")
        group, src = tp_gloo_group(tp)
    try:
        print(_brief(run_rank(cfg, dp_rank, tp_rank, group, src)), flush=True)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
