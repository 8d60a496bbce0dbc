"""model/flops.py against what the model really runs (torch's FlopCounterMode) and the 20B shape.

FlopCounterMode counts matmul ops as they are dispatched. On CPU, SDPA's default kernel
(`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula in torch 2.13, so its
attention would count as zero; the tests therefore run SDPA's math backend, which decomposes
attention into the two bmm it is (scores, values) and autograd's backward into two bmm each.
With that, the analytic count and the counter agree exactly (no tolerance needed): forward,
forward+backward, with and without condition tokens, and the recompute extras per policy.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmdit.config.loader import load_config
from mmdit.config.model import MMDiTArgs
from mmdit.model.flops import (
    forward_breakdown,
    mfu,
    model_params,
    peak_flops,
    recompute_extra_flops,
    step_flops,
)
from mmdit.model.init import init_weights
from mmdit.model.mmdit import build_mmdit, pack_latents, packed_shape
from mmdit.parallel.recompute import apply_recompute
from mmdit.parallel.state import init_parallel, tp_group

BATCH, LAT_H, LAT_W, TEXT = 2, 16, 12, 7  # target latent 16x12 -> 8x6 = 48 packed tokens
COND_H, COND_W = 8, 10  # condition latent of another size -> 4x5 = 20 packed tokens


@pytest.fixture(scope="module")
def tiny():
    """The tiny config with 3 blocks (so every_k=2 checkpoints some blocks and not others)."""
    args = dataclasses.replace(load_config([]).model, num_layers=3)
    init_parallel(1)
    model = build_mmdit(args, tp_group())
    init_weights(model, seed=0)
    return args, model


def _inputs(args: MMDiTArgs, edit: bool):
    g = torch.Generator().manual_seed(0)
    tokens = pack_latents(torch.randn(BATCH, args.latent_channels, LAT_H, LAT_W, generator=g))
    shapes = [packed_shape(LAT_H, LAT_W)]
    if edit:
        cond = pack_latents(torch.randn(BATCH, args.latent_channels, COND_H, COND_W, generator=g))
        tokens = torch.cat([tokens, cond], dim=1)
        shapes.append((1, COND_H // 2, COND_W // 2))
    txt = torch.randn(BATCH, TEXT, args.joint_attention_dim, generator=g)
    mask = torch.ones(BATCH, TEXT, dtype=torch.bool)
    mask[0, 4:] = False  # padded text: attention still computes over the padded keys
    sigmas = torch.rand(BATCH, generator=g)
    return tokens, txt, mask, sigmas, shapes


def _counted(model, args, edit: bool, backward: bool, policy: str = "none", every: int = 2) -> int:
    apply_recompute(model, policy, every)
    counter = FlopCounterMode(display=False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            out = model(*_inputs(args, edit))
            if backward:
                out.square().mean().backward()
    finally:
        apply_recompute(model, "none")
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _cond_tokens(edit: bool) -> int:
    return (COND_H // 2) * (COND_W // 2) if edit else 0


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_step_flops_equal_flop_counter(tiny, edit, backward):
    args, model = tiny
    expected = step_flops(args, BATCH, (LAT_H // 2) * (LAT_W // 2), TEXT, _cond_tokens(edit), backward=backward)
    assert _counted(model, args, edit, backward) == expected


@pytest.mark.parametrize("policy", ["full", "every_k", "attention", "mlp"])
def test_recompute_extra_flops_equal_flop_counter(tiny, policy):
    """Each policy's backward re-runs exactly the forward FLOPs recompute_extra_flops names."""
    args, model = tiny
    shape = (BATCH, (LAT_H // 2) * (LAT_W // 2), TEXT, _cond_tokens(True))
    extra = recompute_extra_flops(args, *shape, policy=policy, every=2)
    assert extra > 0
    assert _counted(model, args, True, True, policy, every=2) == step_flops(args, *shape) + extra


def test_elementwise_recompute_reruns_no_matmul(tiny):
    """Counted by FlopCounterMode: the selective policy keeps every matmul and attention output."""
    args, model = tiny
    shape = (BATCH, (LAT_H // 2) * (LAT_W // 2), TEXT, _cond_tokens(True))
    assert recompute_extra_flops(args, *shape, policy="elementwise") == 0
    assert _counted(model, args, True, True, "elementwise") == step_flops(args, *shape)


def test_recompute_extra_flops_relations():
    args = MMDiTArgs(num_layers=6)
    shape = (2, 1024, 128, 256)
    full = recompute_extra_flops(args, *shape, policy="full")
    assert recompute_extra_flops(args, *shape, policy="none") == 0
    assert full == step_flops(args, *shape, backward=False) - sum(
        f for k, f in forward_breakdown(args, *shape).items() if not k.startswith("blocks."))
    assert recompute_extra_flops(args, *shape, policy="every_k", every=1) == full
    assert recompute_extra_flops(args, *shape, policy="every_k", every=3) < full / 2
    with pytest.raises(ValueError, match="recompute policy"):
        recompute_extra_flops(args, *shape, policy="sometimes")


def test_model_params_equal_built_model(tiny):
    args, model = tiny
    assert model_params(args) == sum(p.numel() for p in model.parameters())
    assert model_params(args, trainable_only=True) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_qwen_image_20b_params_and_flops_per_token():
    """At the released shape: exact parameter count, and per-token FLOPs of the right size.

    Every token meets only its own stream's per-token weights (q/k/v/out 4*D^2 + MLP 8*D^2 per
    block, of 36*D^2 block parameters: the modulation, 12*D^2, is per sample), so the matmul part is
    1/3 of the 6 * params * tokens rule; attention adds 3 * 4*S*D per token and block, i.e.
    S / (18 * D) of that rule. Embeddings, the head and the last block's skipped text output move
    the ratio by < 1%, hence the bounds.
    """
    args = MMDiTArgs()
    assert model_params(args) == 20_430_401_088
    image, text = 6889, 512  # 1328x1328, a long prompt
    joint = image + text
    ratio = step_flops(args, 1, image, text) / (6 * model_params(args) * joint)
    assert 0.3 < ratio < 0.5  # order of magnitude of the 6*N*T rule, below it
    assert ratio == pytest.approx(1 / 3 + joint / (18 * args.hidden_size), rel=0.01)
    assert step_flops(args, 4, image, text) == 4 * step_flops(args, 1, image, text)
    # about 404 TFLOP per 1328x1328 sample with 256 text tokens
    assert 400e12 < step_flops(args, 1, image, 256) < 410e12


def test_peak_flops_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H200 NVL") == 835e12  # the PCIe card is not the SXM part
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
    assert mfu(989e12, 1.0, 2, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 1, 989e12)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="image_tokens"):
        step_flops(MMDiTArgs(), 0, 1024, 128)


@pytest.mark.slow
def test_bench_recompute_reduced_slice_runs(tmp_path):
    """The GPU slice benchmark, reduced to run on CPU in seconds: it must work before a GPU run,
    and its TFLOP/s must come from step_flops for the shape it ran."""
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "slice.json"
    cmd = [sys.executable, str(repo / "bench" / "recompute.py"), "--slice", "--layers", "2", "--heads", "2",
           "--resolution", "128", "--text-tokens", "16", "--policies", "none,full,attention",
           "--repeats", "1", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result
    args = MMDiTArgs(num_layers=2, num_attention_heads=2, attention_head_dim=128, axes_dims_rope=[16, 56, 56])
    assert result["batch"]["image_tokens"] == 64  # 128 px -> 16x16 latent -> 8x8 packed
    assert result["model_flops_per_step"] == step_flops(args, 1, 64, 16)
    policies = result["policies"]
    assert set(policies) == {"none", "full", "attention"}
    for r in policies.values():
        assert r["step_time_s"] > 0 and r["peak_activation_bytes"] > 0
        assert r["model_tflops_per_s"] == pytest.approx(result["model_flops_per_step"] / r["step_time_s"] / 1e12)
        assert r["mfu"] is None  # no peak FLOP/s known for a CPU
    assert policies["full"]["saved_activation_bytes"] < policies["none"]["saved_activation_bytes"]
    assert policies["full"]["hardware_tflops_per_s"] > policies["full"]["model_tflops_per_s"]
    assert result["relative_to_none"]["none"]["peak_activation"] == 1.0
    assert "met" in result["target"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_sequence_parallel_divides_the_blocks_activations(tmp_path):
    """Two real TP ranks, the same model and batch with and without sequence parallelism: each
    rank keeps less for backward, about as the per-token count of a block's saved tensors says."""
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "sp.json"
    cmd = [sys.executable, str(repo / "bench" / "sequence_parallel.py"), "--layers", "2", "--heads", "2",
           "--head-dim", "32", "--joint-dim", "64", "--resolution", "256", "--text-tokens", "16", "--repeats", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["per_rank"]["sequence_parallel"]) == 2 and result["expected_saved_ratio_blocks_only"] == 0.75
    # the replicated head and embeddings are not split: a little above the blocks' 0.75, far below 1
    assert 0.6 < result["saved_ratio"] < 0.9 and result["peak_ratio"] < 0.9


@pytest.mark.slow
def test_bench_attention_kernels_on_padded_text_run(tmp_path):
    """gpu_smoke's attention check, reduced: the packed kernel under selective recompute on a
    micro-batch with padded prompts, recorded as such."""
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "varlen.json"
    cmd = [sys.executable, str(repo / "bench" / "recompute.py"), "--slice", "--layers", "1", "--heads", "2",
           "--resolution", "128", "--text-tokens", "16", "--batch", "2", "--text-valid", "5", "--attention", "varlen",
           "--policies", "elementwise", "--repeats", "1", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["attention"], result["text_valid"], result["batch"]["batch_size"]) == ("varlen", 5, 2)
    assert result["policies"]["elementwise"]["step_time_s"] > 0


@pytest.mark.slow
def test_gpu_smoke_plumbing_runs_and_fails_loudly_without_a_gpu(tmp_path):
    """What CI can check of bench/gpu_smoke.sh without a GPU: the scripts parse, the wheelhouse
    builder's plan, the driver's imports, and a clear failure (not a silent pass) on a CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for script in ("bench/gpu_smoke.sh", "bench/wheelhouse.sh"):
        assert subprocess.run(["bash", "-n", str(root / script)]).returncode == 0
    plan = subprocess.run([str(root / "bench/wheelhouse.sh"), "--dry-run"], capture_output=True, text=True)
    assert plan.returncode == 0 and "megatron-core==0.16.1" in plan.stdout and "antlr4" in plan.stdout
    dry = subprocess.run([sys.executable, str(root / "bench/gpu_smoke.py"), "--dry-run"], capture_output=True,
                         text=True)
    assert dry.returncode == 0 and "resume" in dry.stdout
    env = {**os.environ, "MMDIT_SITE": str(tmp_path / "site"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run([str(root / "bench/gpu_smoke.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode != 0 and "no CUDA device" in run.stderr
