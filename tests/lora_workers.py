"""LoRA helpers for tests, importable by spawned ranks (parallel/spawn.py pickles by name)."""

import torch
from model_workers import odd_lengths_case

from mmdit.config.lora import LoraConfig
from mmdit.config.model import MMDiTArgs
from mmdit.launch.convert import verification_cases
from mmdit.model.lora import apply_lora
from mmdit.model.lora_io import adapter_tensors, load_adapter_state
from mmdit.model.mmdit import build_mmdit
from mmdit.model.sharding import load_full_state_dict, unshard
from mmdit.parallel.recompute import apply_recompute
from mmdit.parallel.state import init_parallel, tp_group

LORA = LoraConfig(rank=4, alpha=8.0, targets=["attn.to_q", "attn.to_v", "attn.add_k_proj", "attn.to_out.0",
                                              "attn.to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1"])
"""Some of q/k/v (the fused adapter with a part missing), both kinds of split, the modulation."""


def lora_model(args: MMDiTArgs, state: dict, adapters: dict | None, tp: int = 1, sequence_parallel: bool = False,
               recompute: str = "none", lora: LoraConfig = LORA):
    init_parallel(tp)
    model = build_mmdit(args, tp_group(), sequence_parallel=sequence_parallel)
    load_full_state_dict(model, state)
    apply_lora(model, lora, seed=3)
    if adapters is not None:
        load_adapter_state(model, adapters)
    apply_recompute(model, recompute, every=2)
    return model


def random_adapters(args: MMDiTArgs, state: dict, seed: int) -> dict[str, torch.Tensor]:
    """Full adapter tensors with a non-zero B, so that A gets a gradient too."""
    model = lora_model(args, state, None)
    g = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(t.shape, generator=g) for name, t, _ in adapter_tensors(model)}


def lora_forward_backward(rank: int, args: MMDiTArgs, tp: int, state: dict, adapters: dict,
                          sequence_parallel: bool = False, recompute: str = "none", case: str = "edit") -> dict:
    """Output and the full gradient of every adapter tensor (diffusers names), gathered over TP;
    the names of the parameters that got a gradient (only adapters should)."""
    model = lora_model(args, state, adapters, tp, sequence_parallel, recompute)
    inputs = odd_lengths_case(args) if case == "odd" else verification_cases(args, seed=1)[case]
    out = model(**inputs)
    (out.float().square().mean() + out.sum() * 1e-3).backward()
    grads = {}
    for name, param, dim in adapter_tensors(model):
        parts = [torch.empty_like(param.grad) for _ in range(tp)]
        torch.distributed.all_gather(parts, param.grad.contiguous(), group=tp_group())
        grads[name] = param.grad if dim is None else unshard(parts, dim)
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    return {"out": out.detach(), "grads": grads, "with_grad": with_grad}


def lora_cases(rank: int, args: MMDiTArgs, tp: int, state: dict, adapters: dict, cases: list[tuple]) -> list[dict]:
    """`lora_forward_backward` of each (sequence_parallel, recompute, case), in one process group."""
    return [lora_forward_backward(rank, args, tp, state, adapters, *case) for case in cases]
