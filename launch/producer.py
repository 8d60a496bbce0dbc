"""`mmdit producer`: one producer process joining a running data service (dataservice/server.py)."""

import logging
import sys

import torch

from mmdit.config.loader import load_config
from mmdit.dataservice.server import run_producer
from mmdit.launch.args import Command, parse

COMMAND = Command("producer", __doc__, sections=("service", "cache", "encoders", "run"))


def main(argv: list[str]) -> int:
    cfg = load_config(parse(COMMAND, argv).overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    return run_producer(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
