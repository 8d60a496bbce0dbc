"""`mmdit synth OUT [num_samples=N ...]`: synthetic text-rendering shards (producer/synth/).

The `synth` section's fields may be written bare: `num_samples=8 kinds.complex=1` is
`synth.num_samples=8 synth.kinds.complex=1`.
"""

import sys

from mmdit.launch.args import Action, Command, parse
from mmdit.producer.synth import scenes
from mmdit.producer.synth.fonts import TextFitError
from mmdit.producer.synth.shards import write_shards

COMMAND = Command("synth", __doc__, sections=("synth",), actions=(Action(
    paths={"OUT": "directory the webdataset shards are written to"}, section="synth"),))


def main(argv: list[str]) -> int:
    from mmdit.config.loader import load_config
    from mmdit.producer.synth.fonts import FontMissingError

    args = parse(COMMAND, argv)
    out = args.paths[0]
    cfg = load_config(args.overrides).synth
    try:
        paths = write_shards(out, cfg)
    except (FontMissingError, TextFitError, scenes.BackgroundsError) as e:
        print(f"mmdit synth: {e}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.num_samples} samples in {len(paths)} shard(s) to {out}")
    return 0
