"""model/memory.py: the activation count against what a small model's step allocates on the CPU,
the parameter and optimizer state against the built model, and `mmdit capacity --memory`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from memory_workers import measure_policies, measure_with_and_without_sp

from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import RECOMPUTE_POLICIES
from mmdit.model.flops import model_params
from mmdit.model.memory import GIB, Layout, activation_bytes, predict, state_bytes
from mmdit.parallel.spawn import spawn

# Activation-dominated: D = 128, 2 x (256 image + 32 text) tokens, 3 blocks (the last one has no
# text output), a text encoder width unlike D so the input side is counted separately.
SMALL = MMDiTArgs(num_layers=3, num_attention_heads=4, attention_head_dim=32, joint_attention_dim=256,
                  axes_dims_rope=[4, 14, 14])
SHAPE = {"batch": 2, "side_px": 256, "text_tokens": 32}
TOLERANCE = 0.10


def predicted(args: MMDiTArgs, policy: str, dtype: str, tp: int = 1, sequence_parallel: bool = False):
    layout = Layout(tp=tp, sequence_parallel=sequence_parallel, recompute=policy, dtype=dtype,
                    micro_batch=SHAPE["batch"], height=SHAPE["side_px"], width=SHAPE["side_px"],
                    text_tokens=SHAPE["text_tokens"])
    return activation_bytes(args, layout)


@pytest.fixture
def one_thread():
    """One torch thread, as the spawned ranks use: on a loaded 2-core machine, OpenMP threads that
    wait for each other make the bf16 CPU kernels several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype, policies", [("bf16", RECOMPUTE_POLICIES), ("fp32", ("none", "full", "elementwise"))])
def test_activations_match_a_cpu_step_for_every_recompute_policy(dtype, policies):
    """Saved-for-backward and peak activation bytes of one step, measured from the CPU allocator,
    within 10% of the count, for each policy (bf16 saves fp32 copies in the q/k norms and RoPE:
    not simply half of fp32); the policies differ by far more than that."""
    measured = measure_policies(0, SMALL, 1, False, dtype, list(policies), **SHAPE)
    for policy in policies:
        saved, peak = measured[policy]
        want_saved, want_peak = predicted(SMALL, policy, dtype)
        assert want_saved == pytest.approx(saved, rel=TOLERANCE), (policy, "saved", want_saved / saved)
        assert want_peak == pytest.approx(peak, rel=TOLERANCE), (policy, "peak", want_peak / peak)
    assert measured["full"][0] < 0.2 * measured["none"][0]  # so a wrong policy could not pass


@pytest.mark.slow
def test_tensor_and_sequence_parallel_activations_per_rank():
    """Two real TP ranks (gloo): each rank's activations with and without sequence parallelism,
    and its parameter count, as the model says."""
    ranks = spawn(measure_with_and_without_sp, 2, SMALL, 2, *SHAPE.values())
    for sp in (False, True):
        want_saved, want_peak = predicted(SMALL, "none", "fp32", tp=2, sequence_parallel=sp)
        for r in (rank[sp] for rank in ranks):
            assert want_saved == pytest.approx(r["none"][0], rel=TOLERANCE), (sp, want_saved / r["none"][0])
            assert want_peak == pytest.approx(r["none"][1], rel=TOLERANCE)
            params, _, _ = state_bytes(SMALL, Layout(tp=2, dtype="fp32"))
            assert params / 4 == pytest.approx(r["params"], rel=0.01)


def test_parameter_gradient_and_optimizer_bytes():
    qwen = MMDiTArgs()
    n = model_params(qwen)
    params, grads, optimizer = state_bytes(qwen, Layout(tp=1, dp=1))
    assert (params, grads, optimizer) == (2 * n, 4 * n, 12 * n)  # bf16, fp32 grads, fp32 master + 2 moments
    _, _, sharded = state_bytes(qwen, Layout(tp=1, dp=8))
    assert sharded == pytest.approx(optimizer / 8)
    _, _, replicated = state_bytes(qwen, Layout(tp=1, dp=8, shard_optimizer=False))
    assert replicated == optimizer
    params8, grads8, _ = state_bytes(qwen, Layout(tp=8, dp=1))
    assert params / 8 < params8 < params / 7  # the blocks split; the embeddings and head replicated
    # LoRA: the frozen base stays in bf16, only adapters (attention + MLP, r=64: ~2% of 20B) train
    lora_params, lora_grads, lora_opt = state_bytes(qwen, Layout(tp=1, dp=1, lora_rank=64))
    d, f = qwen.hidden_size, qwen.mlp_hidden_size
    adapters = qwen.num_layers * 64 * (2 * 4 * 2 * d + 2 * 2 * (d + f))
    assert lora_grads == 4 * adapters and lora_opt == 12 * adapters and lora_params == 2 * (n + adapters)
    fp32 = state_bytes(qwen, Layout(dtype="fp32"))
    assert fp32 == (4 * n, 4 * n, 8 * n)  # no master copy when the parameters are fp32


def test_20b_at_1328_what_fits():
    """The headline of docs/capacity.md: with 20B at 1328^2, one sample per GPU, TP 8 with sequence
    parallelism fits an 80 GB GPU without recompute; TP 1 fits neither card without recompute."""
    qwen = MMDiTArgs()
    tp8_sp = predict(qwen, Layout(tp=8, sequence_parallel=True, dp=64))
    tp1 = predict(qwen, Layout(tp=1, dp=512))
    assert tp8_sp.total < 79.6 * GIB < 140.4 * GIB < tp1.total
    assert tp8_sp.activations < predict(qwen, Layout(tp=8, dp=64)).activations  # SP splits the norms too
    bigger = predict(qwen, dataclasses.replace(Layout(tp=8, dp=64), micro_batch=2))
    assert bigger.activations == pytest.approx(2 * predict(qwen, Layout(tp=8, dp=64)).activations, rel=1e-6)


def test_capacity_memory_command(capsys):
    from mmdit.launch.capacity import main

    assert main(["--memory", "--markdown", "--trainer-gpus", "64"]) == 0
    table = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["TP8+SP DP8 recompute=full"].endswith("| yes | yes |")
    assert rows["TP1 DP64 recompute=none"].endswith("| no | no |")
    assert any("LoRA r=64" in name for name in rows)
