"""`mmdit synth OUT [num_samples=N ...]`: synthetic text-rendering shards (producer/synth/)."""

import sys

from mmdit.producer.synth import scenes
from mmdit.producer.synth.fonts import TextFitError
from mmdit.producer.synth.shards import write_shards

SYNTH_FIELDS = ("num_samples", "kinds", "edit_fraction", "samples_per_shard", "seed", "min_side", "max_side",
                "zh_fraction", "zh_caption_fraction", "font_dir", "backgrounds")


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """`OUT [name=value ...]`: bare SynthConfig field names become `synth.<name>` overrides."""
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise SystemExit("usage: mmdit synth OUT [num_samples=N] [synth.<field>=value ...]")
    overrides = []
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("+~").split(".", 1)[0]  # kinds.complex=1 -> kinds
        overrides.append(f"synth.{arg}" if name in SYNTH_FIELDS else arg)
    return argv[0], overrides


def main(argv: list[str]) -> int:
    from mmdit.config.loader import load_config
    from mmdit.producer.synth.fonts import FontMissingError

    out, overrides = parse_args(argv)
    cfg = load_config(overrides).synth
    try:
        paths = write_shards(out, cfg)
    except (FontMissingError, TextFitError, scenes.BackgroundsError) as e:
        print(f"mmdit synth: {e}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.num_samples} samples in {len(paths)} shard(s) to {out}")
    return 0
