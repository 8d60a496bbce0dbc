"""User rewards for tests, importable by reward workers: nothing heavy, so a spawned worker starts fast."""


def dies_once(latents, prompts):
    """A reward (train.grpo.reward=reward_fns:dies_once) whose worker SIGKILLs itself on the
    first request it gets while $GRPO_DIE_ONCE names a file that does not exist yet (it makes the
    file first); otherwise the latent target's -mean((latents - 0.5)^2)."""
    import os
    import signal
    from pathlib import Path

    marker = os.environ.get("GRPO_DIE_ONCE")
    if marker and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return -(latents - 0.5).square().mean(dim=(1, 2, 3))


def dies_when_told(latents, prompts):
    """A reward (train.grpo.reward=reward_fns:dies_when_told) whose worker SIGKILLs itself on a
    request that comes once the file $REWARD_DIE_WHEN exists (it writes `<file>.died` first);
    otherwise the latent target's -mean((latents - 0.5)^2)."""
    import os
    import signal
    from pathlib import Path

    marker = os.environ.get("REWARD_DIE_WHEN")
    if marker and Path(marker).exists():
        Path(marker + ".died").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return -(latents - 0.5).square().mean(dim=(1, 2, 3))
