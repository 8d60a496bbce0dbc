"""LoRA (model/lora.py, model/lora_io.py): the base at B = 0 and when disabled, TP=2 (and with
sequence parallelism) equal TP=1, training resumes and reshards exactly, merged equals unmerged,
and diffusers' QwenImagePipeline.load_lora_weights runs what mmdit trained."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from lora_workers import LORA, lora_cases, lora_forward_backward, lora_model, random_adapters
from model_workers import random_full_state_dict
from safetensors import safe_open

from mmdit.config.loader import load_config
from mmdit.launch.convert import lora_to_diffusers, merge_lora, meta_partition_dims, to_diffusers, verification_cases
from mmdit.model.checkpoint import import_lora, iter_full_tensors, load_weights, read_index, save_full_state_dict
from mmdit.model.lora import adapter_parameters, disabled
from mmdit.model.lora_io import adapter_tensors, config_of
from mmdit.model.mmdit import build_mmdit
from mmdit.parallel.spawn import spawn
from mmdit.parallel.state import tp_group

TINY = load_config([]).model
TRAIN = ["train.micro_batch_size=2", "train.random_height=128", "train.random_width=128", "optimizer.lr=1e-2",
         "optimizer.warmup_steps=0", "optimizer.lr_schedule=constant", "train.lora.rank=4", "train.lora.alpha=8"]


@pytest.fixture(scope="module")
def state():
    return random_full_state_dict(TINY, seed=7)


def test_zero_b_is_the_base_and_disabled_runs_the_base(state):
    case = verification_cases(TINY, seed=1)["t2i"]
    model = lora_model(TINY, state, None)  # B = 0
    with torch.no_grad():
        with disabled(model):
            base = model(**case)
        assert torch.equal(model(**case), base)
        trained = dict(adapter_parameters(model))
        assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
        assert all(torch.count_nonzero(p) == 0 for n, p in trained.items() if n.endswith("lora_B"))
        for p in trained.values():
            p.normal_(0, 0.1)
        adapted = model(**case)
        with disabled(model):
            assert torch.equal(model(**case), base)
        assert torch.equal(model(**case), adapted) and (adapted - base).abs().max() > 1e-2


@pytest.mark.slow  # inductor compiles the adapted blocks
def test_compiled_blocks_trace_the_adapters_whole(state):
    """torch.compile (a backend without code generation: what dynamo traces is the question): no
    graph break, the eager model's output and adapter gradients, and `disabled` still runs the base."""
    from torch._dynamo.utils import counters

    from mmdit.parallel.compile import compile_blocks

    adapters = random_adapters(TINY, state, seed=5)
    case = verification_cases(TINY, seed=1)["t2i"]
    results = []
    for compiled in (False, True):
        model = lora_model(TINY, state, adapters)
        if compiled:
            counters.clear()
            compile_blocks(model, backend="eager")
        out = model(**case)
        out.square().mean().backward()
        with torch.no_grad(), disabled(model):
            base = model(**case)
        results.append((out.detach(), base, {n: p.grad for n, p in adapter_parameters(model)}))
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] > 0
    (out, base, grads), (c_out, c_base, c_grads) = results
    assert (c_out - out).abs().max() <= 1e-5 and (c_base - base).abs().max() <= 1e-5
    assert (out - base).abs().max() > 1e-2
    assert all((c_grads[n] - g).abs().max() <= 1e-5 for n, g in grads.items())


def test_targets_that_match_no_linear_are_rejected_by_name(state):
    with pytest.raises(ValueError, match=r"\['attn.to_qq'\] match no tensor-parallel linear"):
        lora_model(TINY, state, None, lora=dataclasses.replace(LORA, targets=["attn.to_q", "attn.to_qq"]))
    with pytest.raises(ValueError, match="rank"):
        dataclasses.replace(LORA, rank=-1)


def assert_same(reference: dict, result: dict, atol: float = 1e-5) -> None:
    assert (result["out"] - reference["out"]).abs().max().item() <= atol
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, name
        assert (result["grads"][name] - grad).abs().max().item() <= atol, name
    assert all(".lora.parts." in n for n in result["with_grad"]), "only adapters get gradients"


@pytest.mark.slow
def test_tensor_parallel_lora_equals_single_rank(state):
    """Both kinds of split, a fused q/k/v adapter with k missing, the modulation; with sequence
    parallelism on streams no TP size divides, under selective recompute."""
    adapters = random_adapters(TINY, state, seed=5)
    cases = [(False, "full", "edit"), (True, "elementwise", "odd")]
    references = [lora_forward_backward(0, TINY, 1, state, adapters, case=case) for _, _, case in cases]
    for rank_results in spawn(lora_cases, 2, TINY, 2, state, adapters, cases):
        for reference, result in zip(references, rank_results, strict=True):
            assert_same(reference, result)


def train(run_dir, *overrides):
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "train", f"run.dir={run_dir}", *TRAIN, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, state):
    """A base checkpoint and a 3-step LoRA run from it (the default targets)."""
    root = tmp_path_factory.mktemp("lora")
    save_full_state_dict(state, TINY, meta_partition_dims(TINY), root / "base", tp=1)
    metrics = train(root / "straight", "train.steps=3", f"checkpoint.init_from={root / 'base'}")
    return root, metrics, root / "straight" / "checkpoints" / "step_00000003" / "model"


@pytest.mark.slow
def test_resume_at_tp2_with_sequence_parallel_then_tp1_equals_uninterrupted(trained):
    root, straight, checkpoint = trained
    run = root / "resumed"
    train(run, "train.steps=2", "launch.nproc=2", "parallel.tp=2", "parallel.sequence_parallel=true",
          f"checkpoint.init_from={root / 'base'}")
    step2 = run / "checkpoints" / "step_00000002"
    index = read_index(step2 / "model")
    assert index["tp"] == 2 and all(".lora_" in name for name in index["partition_dims"])  # adapters only
    with safe_open(str(step2 / "optimizer" / "tp01-dp00.safetensors"), "pt") as f:
        assert f.keys() and all(".lora.parts." in k for k in f.keys())
    resumed = train(run, "train.steps=3", f"checkpoint.init_from={root / 'base'}")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-5)
    assert straight[-1]["loss"] < straight[0]["loss"]  # the adapters learn
    expected = dict(iter_full_tensors(checkpoint))
    for name, tensor in iter_full_tensors(run / "checkpoints" / "step_00000003" / "model"):
        assert (tensor - expected[name]).abs().max().item() <= 1e-5, name


def unmerged_model(checkpoint, state):
    record = read_index(checkpoint)["lora"]
    return lora_model(TINY, state, dict(iter_full_tensors(checkpoint)), lora=config_of(record))


@pytest.mark.slow
def test_merged_equals_unmerged_and_diffusers_loads_the_adapter(trained, state, tmp_path):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    root, _, checkpoint = trained
    case = verification_cases(TINY, seed=2)["edit"]
    model = unmerged_model(checkpoint, state)
    with torch.no_grad():
        unmerged = model(**case)
        with disabled(model):
            base = model(**case)
    assert (unmerged - base).abs().max() > 1e-3  # training moved the adapters off B = 0

    merge_lora(str(checkpoint), str(tmp_path / "merged"), tp=2)  # base found in the checkpoint's record
    for source in (tmp_path / "merged", checkpoint):  # the full merged checkpoint; a LoRA one merged on load
        plain = build_mmdit(TINY, tp_group())
        load_weights(plain, source)
        with torch.no_grad():
            assert (plain(**case) - unmerged).abs().max().item() <= 1e-5, source

    file = lora_to_diffusers(str(checkpoint), str(tmp_path / "lora"))
    to_diffusers(str(root / "base"), str(tmp_path / "base_diffusers"))
    transformer = QwenImageTransformer2DModel.from_pretrained(tmp_path / "base_diffusers").eval()
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = transformer(hidden_states=case["img_tokens"], encoder_hidden_states=case["txt"],
                             encoder_hidden_states_mask=case["txt_mask"], timestep=case["sigmas"],
                             img_shapes=[case["image_shapes"]] * 2).sample
    assert (theirs - unmerged).abs().max().item() <= 1e-4 < (theirs - base).abs().max().item()

    again = unmerged_model(checkpoint, state)  # import the diffusers file, the mmdit checkpoint
    expected = dict(iter_full_tensors(checkpoint))
    for source, scale in ((file, again.lora_info["scale"]), (checkpoint, 1.0)):  # another scale: B rescaled
        for _, p in adapter_parameters(again):
            p.data.zero_()
        assert import_lora(again, source, scale) == []
        for name, tensor, _ in adapter_tensors(again):
            want = expected[name] * (again.lora_info["scale"] / scale if "lora_B" in name else 1.0)
            assert (tensor - want).abs().max().item() <= 1e-6, name
