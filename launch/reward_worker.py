"""`mmdit reward-worker`: one GRPO reward worker joining a running data service (consumer/reward_worker.py)."""

import logging
import sys

from mmdit.config.loader import load_config
from mmdit.consumer.reward_worker import run_reward_worker
from mmdit.launch.args import Command, parse

COMMAND = Command("reward-worker", __doc__, sections=("service", "train", "encoders", "run"))


def main(argv: list[str]) -> int:
    cfg = load_config(parse(COMMAND, argv).overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return run_reward_worker(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
