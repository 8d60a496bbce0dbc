"""Optimizer state written per rank and read back at any TP x DP layout (parallel/optimizer_state.py).

Seeded random layouts: parameters of random shapes split along random dims (or replicated),
owned per DP rank either as whole parameters (ZeRO-1) or as flat ranges cut anywhere (megatron's
DistributedOptimizer buckets). Whatever layout writes, every rank of any other layout reads back
exactly its part of the full state.
"""

import math
import random

import pytest
import torch

from mmdit.parallel.optimizer_state import OwnedRange, ParamLayout, StateReader, state_file, write_rank_state


def random_layouts(rng: random.Random, tps: tuple[int, ...]) -> dict[str, ParamLayout]:
    lcm = 1
    for t in tps:
        lcm = lcm * t // math.gcd(lcm, t)
    layouts = {}
    for i in range(rng.randint(1, 7)):
        ndim = rng.choice([1, 2])
        shape = [rng.randint(1, 4) * lcm for _ in range(ndim)]
        dim = rng.choice([None, *range(ndim)])
        layouts[f"blocks.{i}.w"] = ParamLayout(tuple(shape), dim)
    return layouts


def local_full(full: torch.Tensor, layout: ParamLayout, tp: int, tp_rank: int) -> torch.Tensor:
    return full if layout.dim is None else full.chunk(tp, dim=layout.dim)[tp_rank]


def owned_ranges(rng: random.Random, layouts, tp: int, dp: int, style: str) -> list[dict[str, OwnedRange]]:
    """Per DP rank, what it owns of each parameter's TP-local tensor."""
    owned = [{} for _ in range(dp)]
    names = list(layouts)
    if style == "zero":  # whole parameters, dealt out
        for name in names:
            n = torch.Size(layouts[name].local_shape(tp)).numel()
            owned[rng.randrange(dp)][name] = OwnedRange(0, n)
        return owned
    sizes = [torch.Size(layouts[n].local_shape(tp)).numel() for n in names]  # megatron: one flat buffer
    total = sum(sizes)
    cuts = sorted(rng.sample(range(1, total), min(dp - 1, total - 1))) if dp > 1 else []
    bounds = [0, *cuts, total] + [total] * (dp + 1 - len(cuts) - 2)
    offset = 0
    for name, size in zip(names, sizes):
        for r in range(dp):
            lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + size)
            if lo < hi:
                owned[r][name] = OwnedRange(lo - offset, hi - offset)
        offset += size
    return owned


@pytest.mark.parametrize("seed", range(60))
def test_any_layout_reads_back_what_any_layout_wrote(tmp_path, seed):
    rng = random.Random(seed)
    old_tp, new_tp = rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
    old_dp, new_dp = rng.randint(1, 4), rng.randint(1, 4)
    layouts = random_layouts(rng, (old_tp, new_tp))
    g = torch.Generator().manual_seed(seed)
    full = {name: {key: torch.randn(layout.shape, generator=g) for key in ("exp_avg", "exp_avg_sq")}
            for name, layout in layouts.items()}
    steps = {name: torch.tensor(float(rng.randint(1, 99))) for name in layouts}

    for tp_rank in range(old_tp):
        for dp_rank, ranges in enumerate(owned_ranges(rng, layouts, old_tp, old_dp, rng.choice(["zero", "flat"]))):
            states = {}
            for name, r in ranges.items():
                states[name] = {k: local_full(full[name][k], layouts[name], old_tp, tp_rank).reshape(-1)[r.start:r.end]
                                for k in ("exp_avg", "exp_avg_sq")}
                states[name]["step"] = steps[name]
            write_rank_state(state_file(tmp_path, tp_rank, dp_rank), states, ranges, old_tp, old_dp)

    reader = StateReader(tmp_path, old_tp, old_dp, layouts)
    for tp_rank in range(new_tp):
        for ranges in owned_ranges(rng, layouts, new_tp, new_dp, rng.choice(["zero", "flat"])):
            for name, r in ranges.items():
                assert reader.keys(name) == {"exp_avg", "exp_avg_sq"}
                assert float(reader.step(name)) == float(steps[name])
                for k in ("exp_avg", "exp_avg_sq"):
                    expected = local_full(full[name][k], layouts[name], new_tp, tp_rank).reshape(-1)[r.start:r.end]
                    assert torch.equal(reader.read(name, k, new_tp, tp_rank, r), expected), (name, k, r)


def test_a_range_the_checkpoint_does_not_cover_is_an_error(tmp_path):
    layouts = {"w": ParamLayout((8,), None)}
    write_rank_state(state_file(tmp_path, 0, 0), {"w": {"exp_avg": torch.ones(4)}}, {"w": OwnedRange(0, 4)}, 1, 1)
    reader = StateReader(tmp_path, 1, 1, layouts)
    assert torch.equal(reader.read("w", "exp_avg", 1, 0, OwnedRange(1, 3)), torch.ones(2))
    with pytest.raises(KeyError, match="covers 4 of the 8 elements"):
        reader.read("w", "exp_avg", 1, 0, OwnedRange(0, 8))
