"""`mmdit model-info model=... parallel.tp=N`: build one rank's shard on the meta device and
print its size as one JSON line (no memory is allocated, so the 20B model at TP=8 is instant)."""

import json
import math

from mmdit.config.loader import load_config
from mmdit.launch.args import Command, parse
from mmdit.model.mmdit import build_mmdit
from mmdit.model.sharding import full_shapes, partition_dims
from mmdit.parallel.state import destroy_parallel, init_fake_parallel, tp_group

COMMAND = Command("model-info", __doc__, sections=("model", "parallel"))


def model_info(args, tp: int) -> dict:
    init_fake_parallel(tp)
    try:
        model = build_mmdit(args, tp_group(), device="meta")
        dims, shapes = partition_dims(model), full_shapes(model)
        total = sum(math.prod(s) for s in shapes.values())
        per_rank = sum(p.numel() for p in model.parameters())
        replicated = {n: math.prod(shapes[n]) for n, d in dims.items() if d is None}
        return {
            "params_total": total,
            "params_per_rank": per_rank,
            "tp": tp,
            "params_replicated": sum(replicated.values()),
            "largest_replicated": max(replicated, key=replicated.get),
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
        }
    finally:
        destroy_parallel()


def main(argv: list[str]) -> int:
    cfg = load_config(parse(COMMAND, argv).overrides)
    print(json.dumps(model_info(cfg.model, cfg.parallel.tp)))
    return 0
