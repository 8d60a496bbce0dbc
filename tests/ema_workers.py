"""A trainer rank for the EMA tests, importable by spawned ranks (parallel/spawn.py pickles by name)."""


def train_rank(rank: int, overrides: list[str]) -> dict:
    """One rank of `mmdit train` with these overrides (spawn sets the torchrun environment)."""
    from mmdit.config.loader import load_config
    from mmdit.consumer.trainer import Trainer

    return Trainer(load_config(overrides)).run()
