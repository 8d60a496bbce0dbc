"""`mmdit vae-train`: fine-tune the VAE's decoder on text-rich images, the encoder frozen.

Loads AutoencoderKLQwenImage from vae.model (or encoders.dir), trains `post_quant_conv` +
`decoder` on seeded random crops of vae.text_shards (and vae.general_shards, mixed by
vae.text_fraction) with an L1/L2 + LPIPS loss, evaluates PSNR, SSIM and OCR word accuracy on
held-out text-rich crops before and after, and exports run.dir/export/ (the base layout with the
new vae/), which encoders.dir, `mmdit sample`, the producers and QwenImagePipeline take. Every
latent cached with the base VAE stays valid. `launch.nproc=N` trains on N local data-parallel
ranks (torch DDP); under torchrun or SLURM each rank runs this command.
"""

import json
import logging
import os
import sys

from mmdit.config import ConfigError
from mmdit.config.loader import load_config
from mmdit.config.vae import check_vae_job
from mmdit.launch.args import Command, parse
from mmdit.utils.processes import is_rank

COMMAND = Command("vae-train", __doc__, sections=("vae", "encoders", "run", "launch", "seed"))


def check_inputs(cfg) -> None:
    """What can be checked before any rank starts: the config across sections, the model and the
    LPIPS weights exist."""
    from pathlib import Path

    from mmdit.consumer.vae.model import vae_folder

    try:
        check_vae_job(cfg.vae, cfg.encoders.dir, max(1, cfg.launch.nproc))
        vae_folder(cfg.vae.model or cfg.encoders.dir)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if cfg.vae.uses_perceptual and not Path(cfg.vae.perceptual_dir).is_dir():
        raise ConfigError(f"vae.perceptual_dir={cfg.vae.perceptual_dir} is not a directory")


def main(argv: list[str]) -> int:
    cfg = load_config(parse(COMMAND, argv).overrides)
    check_inputs(cfg)
    from mmdit.launch.local import main_or_launch
    from mmdit.utils.processes import ProcessTable, SignalStop

    code = main_or_launch("vae-train", argv, cfg, role="vae_trainer")
    if code is not None:
        return code
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    table = None
    if not is_rank():  # one process, started by hand: it records itself
        table = ProcessTable(cfg.run.dir)
        table.add("vae_trainer", "vae_trainer_rank0", os.getpid())
    import torch.distributed as dist

    from mmdit.consumer.vae.trainer import VaeTrainer

    stop = SignalStop()
    code = 1
    try:
        summary = VaeTrainer(cfg, stop).run()
        if dist.get_rank() == 0:
            print(json.dumps(summary))
        code = 130 if stop.is_set() else 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if table is not None:
            table.set_returncode(os.getpid(), code)
        stop.restore()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
