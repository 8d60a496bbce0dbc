"""Tensor parallelism with real gloo processes: TP=2 and TP=3 equal TP=1, with and without
sequence parallelism; checkpoints reshard."""

import dataclasses

import pytest
from model_workers import (
    forward_backward,
    forward_from_state,
    outputs_from_checkpoint,
    random_full_state_dict,
    save_sharded,
)

from mmdit.config.loader import load_config
from mmdit.parallel.spawn import spawn

TINY = load_config([]).model


def assert_same_step(reference: dict, result: dict, atol: float = 1e-5) -> None:
    assert (result["out"] - reference["out"]).abs().max().item() <= atol
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        diff = (result["grads"][name] - grad).abs().max().item()
        assert diff <= atol, f"{name}: {diff}"


def test_sequence_parallel_with_transformer_engine_layers_is_rejected_with_the_reason():
    from mmdit.config import ConfigError

    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.layers=local or auto"):
        load_config(["parallel.tp=2", "launch.nproc=2", "parallel.sequence_parallel=true", "parallel.layers=te"])
    assert load_config(["parallel.tp=2", "launch.nproc=2", "parallel.sequence_parallel=true"]).parallel.sequence_parallel


@pytest.mark.slow  # real processes, as every test below
@pytest.mark.parametrize("tp,heads", [(2, 4), (3, 3)])
def test_tensor_parallel_equals_single_rank(tp, heads):
    """heads=3 is divisible by 3 only: each of 3 ranks owns one head of both streams."""
    args = dataclasses.replace(TINY, num_attention_heads=heads)
    state = random_full_state_dict(args, seed=7)
    reference = forward_backward(0, args, 1, state)
    results = spawn(forward_backward, tp, args, tp, state)
    for rank_result in results:  # the output and the gathered gradients are the same on every rank
        assert_same_step(reference, rank_result)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "elementwise"])
def test_tensor_parallel_with_recompute(policy):
    """elementwise keeps the all-reduce outputs: backward must not re-run (or reorder) them."""
    state = random_full_state_dict(TINY, seed=8)
    reference = forward_backward(0, TINY, 1, state)
    assert_same_step(reference, spawn(forward_backward, 2, TINY, 2, state, policy)[0])


@pytest.mark.slow
@pytest.mark.parametrize("tp,heads,case,attention,recompute", [
    (2, 4, "edit", "sdpa", "none"),
    (3, 3, "edit", "varlen", "none"),  # 160 image tokens: padded to 162 over 3 ranks
    (2, 4, "odd", "varlen", "elementwise"),  # 35 image and 11 text tokens: both streams padded
])
def test_sequence_parallel_equals_single_rank(tp, heads, case, attention, recompute):
    """Every rank's output and gradients (its own copy of each replicated one too: a row bias or
    a modulation weight sees only this rank's tokens) equal TP=1 without sequence parallelism."""
    args = dataclasses.replace(TINY, num_attention_heads=heads)
    state = random_full_state_dict(args, seed=11)
    reference = forward_backward(0, args, 1, state, case=case)
    for rank_result in spawn(forward_backward, tp, args, tp, state, recompute, case, False, True, attention):
        assert_same_step(reference, rank_result)


@pytest.mark.slow
@pytest.mark.parametrize("saved_tp,loaded_tp", [(2, 1), (1, 2)])
def test_checkpoint_reshards(tmp_path, saved_tp, loaded_tp):
    state = random_full_state_dict(TINY, seed=9)
    path = str(tmp_path / "ckpt")
    spawn(save_sharded, saved_tp, TINY, state, path, saved_tp)
    got = spawn(outputs_from_checkpoint, loaded_tp, path, loaded_tp)
    expected = forward_from_state(TINY, state)
    for out in got:
        assert (out - expected).abs().max().item() <= 1e-5
