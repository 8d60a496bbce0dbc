"""`mmdit train`: flow-matching training of the MMDiT with TP x DP.

Run it directly (one process, or `launch.nproc=N` local ranks) or under torchrun/SLURM. This
module is the command: it checks the config and the inputs, starts the ranks when asked to, and
imports the model stack (consumer/trainer.py: megatron-core, several seconds) only in a process
that trains. So a bad config is rejected at once, and a launcher stays light.
"""

import json
import logging
import os
import sys
from pathlib import Path

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.config.loader import load_config
from mmdit.launch.args import Command, parse
from mmdit.utils.processes import is_rank

COMMAND = Command("train", __doc__, sections=("train", "optimizer", "checkpoint", "eval", "model", "parallel", "data",
                                              "service", "encoders", "run", "launch", "seed"))


def check_inputs(cfg: JobConfig) -> None:
    """What can be checked before any rank starts: the weights to start from, the data service."""
    if cfg.checkpoint.init_from and not Path(cfg.checkpoint.init_from).exists():
        raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} does not exist")
    if cfg.train.data_source == "service":
        from mmdit.dataservice.address import reach

        # by hand, a missing service is a quick error; under a launcher (SLURM), the service may
        # still be starting on another node: wait as long as joining would
        timeout = cfg.service.join_timeout_s if is_rank() else min(10.0, cfg.service.join_timeout_s)
        reach(cfg.service, timeout)


def rank_env(cfg: JobConfig) -> None:
    """A rank's gloo sockets listen on service.advertise_host's interface when one is set and the
    launcher did not choose (the local launcher sets loopback); otherwise utils/store.py takes
    the route to the job's store host."""
    if is_rank() and cfg.service.advertise_host and not os.environ.get("GLOO_SOCKET_IFNAME"):
        from mmdit.utils.netaddr import AddressError, advertised

        try:
            where = advertised(cfg.service.advertise_host, os.environ.get("MASTER_ADDR", "127.0.0.1"))
        except AddressError as e:
            raise ConfigError(str(e)) from None
        os.environ["GLOO_SOCKET_IFNAME"] = where.interface


def main(argv: list[str]) -> int:
    cfg = load_config(parse(COMMAND, argv).overrides)
    check_inputs(cfg)
    rank_env(cfg)
    from mmdit.launch.local import main_or_launch
    from mmdit.utils.processes import ProcessTable

    code = main_or_launch("train", argv, cfg, role="trainer")
    if code is not None:
        return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    table = None
    if not is_rank():  # one process, started by hand: it records itself
        table = ProcessTable(cfg.run.dir)
        table.add("trainer", "trainer_rank0", os.getpid())
    import torch.distributed as dist

    from mmdit.consumer.trainer import Trainer
    from mmdit.parallel.state import destroy_parallel

    code = 1
    try:
        summary = Trainer(cfg).run()
        if dist.get_rank() == 0:
            print(json.dumps(summary))
        code = 0
    finally:
        destroy_parallel()
        if table is not None:
            table.set_returncode(os.getpid(), code)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
