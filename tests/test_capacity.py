"""`mmdit capacity`: the figures follow from the model's FLOPs and the assumptions, as stated."""

import dataclasses
import subprocess
import sys

import pytest

from mmdit.config.loader import load_config
from mmdit.launch import capacity
from mmdit.model.flops import step_flops


@pytest.fixture(scope="module")
def qwen():
    return load_config(["model=qwen_image_20b"]).model


def test_vae_encoder_flops_grow_with_the_image_area():
    small, large = capacity.vae_encode_flops(128), capacity.vae_encode_flops(256)
    assert large / small == pytest.approx(4.0, rel=0.02)


def test_training_side_is_the_model_flops_at_the_assumed_utilization(qwen):
    a = capacity.Assumptions(edit_fraction=0.0, trainer_mfu=0.5, peak_tflops=1000.0)
    fig = capacity.stage_figures(qwen, a, 1024, vae_flops=1e12)
    flops = step_flops(qwen, 1, (1024 // 16) ** 2, a.prompt_tokens)
    assert fig["train_tflop_per_sample"] == pytest.approx(flops / 1e12)
    assert fig["trainer_samples_per_s_per_gpu"] == pytest.approx(0.5 * 1000e12 / flops)
    # a faster trainer needs proportionally more producers and coordinator calls
    faster = capacity.stage_figures(qwen, dataclasses.replace(a, trainer_mfu=1.0), 1024, vae_flops=1e12)
    assert faster["producer_gpus_per_trainer_gpu"] == pytest.approx(2 * fig["producer_gpus_per_trainer_gpu"])
    assert faster["coordinator_ops_per_s"] == pytest.approx(2 * fig["coordinator_ops_per_s"])
    # edits cost the trainer more per sample (their source image joins the sequence)
    edits = capacity.stage_figures(qwen, dataclasses.replace(a, edit_fraction=1.0), 1024, vae_flops=1e12)
    assert edits["train_tflop_per_sample"] > fig["train_tflop_per_sample"]


def test_coordinator_calls_per_batch_are_one_lease_and_a_locate_and_ack_per_dp_rank():
    a = capacity.Assumptions(trainer_gpus=64, tp=8, global_batch=64)
    assert capacity.coordinator_ops(a, trainer_sps=1.0) == pytest.approx(1 * (1 + 2 * 8))


@pytest.mark.slow
def test_the_cli_prints_every_stage_and_rejects_a_bad_flag():
    done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "capacity", "--markdown", "--trainer-mfu", "0.5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == list(capacity.STAGES)
    bad = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "capacity", "--trainer-mfu", "fast"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "trainer-mfu" in bad.stderr
