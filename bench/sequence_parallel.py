"""Sequence parallelism benchmark: activation memory per TP rank with and without it, one run.

    python bench/sequence_parallel.py                      # CPU, TP=2 over gloo
    python bench/sequence_parallel.py --tp 4 --device cuda --dtype bf16

The same model (the same weights at every TP size) and batch run as TP ranks twice, once with
`parallel.sequence_parallel` off and once on; each rank measures one training step's activation
memory (bench/common.py: saved for backward, and peak) after a warm-up step. The result is each
rank's memory with sequence parallelism relative to without, next to the ratio a per-token count
of what each block saves predicts. Step times are recorded, but on CPU with gloo they say little
(one core per rank, collectives over loopback); the GPU run says what sequence parallelism costs.
"""

import argparse
import sys
import time
from pathlib import Path

from common import (  # bench/ is a scripts folder: run as `python bench/sequence_parallel.py`
    DTYPES,
    BatchShape,
    args_dict,
    build_model,
    environment,
    make_batch,
    measure_memory,
    median,
    rope_axes,
    time_step,
    write_json,
)

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import ParallelConfig
from mmdit.parallel.spawn import spawn

RESULTS = Path(__file__).resolve().parent / "results"


def expected_saved_ratio(tp: int) -> float:
    """What a block keeps for backward, per token in units of the hidden size D: without sequence
    parallelism, 8 D replicated on every rank (two norms' inputs and normalized outputs, the two
    modulated inputs of the column linears, the two gated sub-layer outputs) plus 16 D split over
    the ranks (q, k, v, attention output and the row linear's input: 5 D; the MLP's 4 D-wide
    hidden before and after GELU: 8 D; the row-parallel output projections' inputs: 3 D, counted
    with the attention). With it, all 24 D are split."""
    return (24 / tp) / (8 + 16 / tp)


def rank_step(rank: int, args: MMDiTArgs, shape: BatchShape, tp: int, sequence_parallel: bool, device: str,
              dtype_name: str, repeats: int) -> dict:
    import torch

    if device == "cuda":  # spawn's ranks join with NCCL, each on the GPU of its local rank
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    parallel = ParallelConfig(tp=tp, layers="local", sequence_parallel=sequence_parallel)
    model = build_model(args, device, dtype_name, parallel).model
    batch = make_batch(args, shape, device, DTYPES[dtype_name])
    time_step(model, batch, device)  # warm-up: allocates .grad, so memory below is activations
    memory = measure_memory(model, batch, device)
    times = [time_step(model, batch, device).wall_s for _ in range(repeats)]
    return {"saved_bytes": memory.saved_bytes, "peak_bytes": memory.peak_bytes, "method": memory.method,
            "step_s_median": median(times)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--joint-dim", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=512, help="square image in pixels")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    started = time.time()
    args = MMDiTArgs(num_layers=opts.layers, num_attention_heads=opts.heads, attention_head_dim=opts.head_dim,
                     joint_attention_dim=opts.joint_dim, axes_dims_rope=rope_axes(opts.head_dim))
    shape = BatchShape(opts.batch, opts.resolution, opts.resolution, opts.text_tokens)
    runs = {}
    for sequence_parallel in (False, True):
        per_rank = spawn(rank_step, opts.tp, args, shape, opts.tp, sequence_parallel, opts.device, opts.dtype,
                         opts.repeats)
        runs["sequence_parallel" if sequence_parallel else "tensor_parallel"] = per_rank
    off, on = runs["tensor_parallel"], runs["sequence_parallel"]
    saved_ratio = max(r["saved_bytes"] for r in on) / max(r["saved_bytes"] for r in off)
    peak_ratio = max(r["peak_bytes"] for r in on) / max(r["peak_bytes"] for r in off)
    result = {
        "benchmark": "sequence_parallel",
        "environment": environment(opts.device),
        "model": args_dict(args),
        "batch": {"batch": shape.batch, "image_tokens": shape.image_tokens, "text_tokens": shape.text_tokens,
                  "resolution": opts.resolution, "dtype": opts.dtype},
        "tp": opts.tp,
        "per_rank": runs,
        "saved_ratio": saved_ratio,
        "peak_ratio": peak_ratio,
        "expected_saved_ratio_blocks_only": expected_saved_ratio(opts.tp),
        "step_time_ratio": max(r["step_s_median"] for r in on) / max(r["step_s_median"] for r in off),
        "wall_s": time.time() - started,
    }
    out = Path(opts.out) if opts.out else RESULTS / f"sequence_parallel_{opts.device}.json"
    write_json(result, out)
    print(f"TP={opts.tp}: activation memory saved for backward x{saved_ratio:.2f} with sequence parallelism "
          f"(blocks alone predict x{expected_saved_ratio(opts.tp):.2f}), peak x{peak_ratio:.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
