"""A trainer joins the data service only when they agree (dataservice/protocol.py JOIN_CHECKS):
latent channels, patch, text width, the resolution schedule and the cache fingerprint. A trainer
that does not match exits 2 naming the field and both values, before any step, without touching
the service; a matching trainer trains on.

In-process: the comparison and the service's description of a cache. Real processes: `mmdit serve`
with `mmdit train` (model width, base resolution, a matching one) and `mmdit consume` at TP 2
(both TP ranks exit, none waits for a broadcast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdit.cache.store import LatentCache
from mmdit.dataservice.protocol import JOIN_CHECKS, ServiceDescription, disagreements, expectation
from mmdit.utils.processes import ServeProcess, free_port

FP = "fp_join-b256"
TEXT_WIDTH = 64  # the tiny model's joint_attention_dim (conf/model/tiny.yaml)


def records(n=8, fingerprint=FP, width=TEXT_WIDTH, side=64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        h, w = side, side * (1 + i % 2)
        out.append({"key": f"k{i:03d}", "fingerprint": fingerprint, "bucket": (h, w), "task": "t2i", "caption": f"c{i}",
                    "source": "s", "latents": torch.randn(16, h // 8, w // 8, generator=g),
                    "prompt_embeds": torch.randn(3 + i % 3, width, generator=g)})
    return out


def described(**changes) -> ServiceDescription:
    base = dict(fingerprints=[FP], latent_channels=16, latent_side_multiple=8, text_width=TEXT_WIDTH,
                base_resolution=256, stage_weights={}, curriculum=[], dp_size=1)
    return ServiceDescription(**{**base, **changes})


def expected(**changes) -> dict:
    base = {"model.out_channels": 16, "model.patch_size": 2, "model.joint_attention_dim": TEXT_WIDTH,
            "data.base_resolution": 256, "data.stage_weights": {}, "data.curriculum": []}
    return {**base, **changes}


# ----------------------------------------------------------------------------- in process


def test_a_matching_trainer_agrees():
    assert disagreements(expected(), described()) == []
    assert disagreements(expected(**{"service.fingerprint": FP}), described(fingerprints=["a-b640", FP])) == []


@pytest.mark.parametrize("key, trainer, service, shown", [
    ("model.joint_attention_dim", 128, {"text_width": 64}, "model.joint_attention_dim: trainer 128, service 64"),
    ("model.out_channels", 32, {}, "model.out_channels: trainer 32, service 16"),
    ("model.patch_size", 4, {"latent_side_multiple": 6}, "model.patch_size: trainer 4, service 6"),
    ("data.base_resolution", 640, {}, "data.base_resolution: trainer 640, service 256"),
    ("data.stage_weights", {640: 1}, {}, "data.stage_weights: trainer {'640': 1.0}, service {}"),
    ("data.curriculum", [{"step": 5, "base_resolution": 640}], {}, "data.curriculum: trainer [{'step': 5, "),
    ("service.fingerprint", "other-b256", {}, f"service.fingerprint: trainer 'other-b256', service ['{FP}']"),
])
def test_each_field_that_differs_is_named_with_both_values(key, trainer, service, shown):
    (problem,) = disagreements(expected(**{key: trainer}), described(**service))
    assert problem.startswith(shown), problem


def test_every_disagreement_is_reported_at_once():
    problems = disagreements(expected(**{"model.joint_attention_dim": 128, "data.base_resolution": 640}), described())
    assert [p.split(":")[0] for p in problems] == ["model.joint_attention_dim", "data.base_resolution"]


def test_what_either_side_does_not_know_is_not_checked():
    # a consumer without a model, a cache without stages, a service with no cached record yet
    assert disagreements({"data.base_resolution": 640}, described(base_resolution=None)) == []
    assert disagreements(expected(**{"model.joint_attention_dim": 128}), described(text_width=None)) == []
    assert disagreements({k: v for k, v in expected().items() if not k.startswith("model.")},
                         described(text_width=1, latent_channels=2)) == []


def test_patch_must_tile_every_latent_side():
    assert disagreements(expected(**{"model.patch_size": 4}), described(latent_side_multiple=8)) == []
    assert disagreements(expected(**{"model.patch_size": 2}), described(latent_side_multiple=6)) == []
    assert len(disagreements(expected(**{"model.patch_size": 4}), described(latent_side_multiple=6))) == 1


def test_the_expectation_reads_the_config_keys_of_the_table():
    from mmdit.config.loader import load_config

    cfg = load_config(["model.joint_attention_dim=128", "data.base_resolution=640"])
    trainer = expectation(cfg, model=True)
    assert set(trainer) == {c.key for c in JOIN_CHECKS} - {"service.fingerprint"}  # "" expects any fingerprint
    assert trainer["model.joint_attention_dim"] == 128 and trainer["data.base_resolution"] == 640
    consumer = expectation(load_config(["service.fingerprint=x-b256"]), model=False)
    assert consumer["service.fingerprint"] == "x-b256" and not any(k.startswith("model.") for k in consumer)


def test_the_service_describes_its_cache(tmp_path):
    from mmdit.config.data import DataConfig
    from mmdit.dataservice.coordinator import service_description
    from mmdit.dataservice.selection import build_selection, resolve_stages

    cache = LatentCache(tmp_path)
    cache.write(records(4) + records(4, fingerprint="fp_join-b640", side=96))
    stages = resolve_stages(cache, FP)
    selection, _ = build_selection(cache, stages)
    d = service_description(cache, stages, 256, selection, DataConfig(stage_weights={"256": 1, "640": 2}), dp_size=2)
    assert d.fingerprints == ["fp_join-b256", "fp_join-b640"]
    assert (d.latent_channels, d.text_width, d.base_resolution, d.dp_size) == (16, TEXT_WIDTH, 256, 2)
    assert d.latent_side_multiple == 4  # 96 px sides are 12 latents, 64 px ones 8: patch 4 tiles both
    assert d.stage_weights == {"256": 1.0, "640": 2.0}


# ----------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`mmdit serve` over a tiny cache at the 256 stage, text width 64 (the tiny model's), on any
    free port; half its records have bf16 prompt features, half fp32 (a cache written before and
    after cache.feature_dtype), in both buckets."""
    tmp = tmp_path_factory.mktemp("join")
    cache = LatentCache(tmp / "cache")
    recs = records()
    cache.write([{**r, "prompt_embeds": r["prompt_embeds"].bfloat16()} for i, r in enumerate(recs) if i % 4 < 2])
    cache.write([r for i, r in enumerate(recs) if i % 4 >= 2])
    common = [f"cache.dir={tmp / 'cache'}", "service.producers=1", "train.micro_batch_size=1",
              "service.heartbeat_s=0.5", "service.join_timeout_s=120", "service.consumer_timeout_s=120",
              "train.tensorboard=false"]
    serve = ServeProcess([*common, f"run.dir={tmp / 'service'}"])
    yield {"dir": tmp, "common": [*common, *serve.client_overrides], "serve": serve}
    serve.stop()
    serve.kill()


def service_status(service) -> dict:
    return json.loads((service["dir"] / "service" / "service.json").read_text())


def start(command: str, run_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", command, f"run.dir={run_dir}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trainer_that_does_not_match_exits_2_and_the_service_trains_the_one_that_does(service):
    tmp, common = service["dir"], service["common"]
    train = [*common, "train.data_source=service"]
    wide = start("train", tmp / "wide", *train, "model.joint_attention_dim=128", "train.steps=2")
    sharp = start("train", tmp / "sharp", *train, "data.base_resolution=640", "train.steps=2")
    good = start("train", tmp / "good", *train, "train.steps=2")
    outcomes = {name: (proc.wait(timeout=400), proc.communicate()[1])
                for name, proc in (("wide", wide), ("sharp", sharp), ("good", good))}
    for name, field in (("wide", "model.joint_attention_dim: trainer 128, service 64"),
                        ("sharp", "data.base_resolution: trainer 640, service 256")):
        code, err = outcomes[name]
        assert code == 2 and field in err, f"{name}: exit {code}\n{err[-3000:]}"
        assert "Traceback" not in err and not (tmp / name / "metrics.jsonl").exists(), err[-3000:]
    code, err = outcomes["good"]
    assert code == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp / "good" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    # the rejected trainers never registered: no plan generation was started for them
    assert service["serve"].proc.poll() is None
    status = service_status(service)
    assert status["counters"]["resets"] == 0 and status["description"]["text_width"] == TEXT_WIDTH


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_tp_rank_exits_when_tp_rank_0_is_rejected(service):
    """Two ranks of one TP group started by hand (no launcher to stop a rank left waiting): TP
    rank 1 gets its batches by broadcast from TP rank 0, so it must learn that TP rank 0 was
    rejected rather than wait for a batch that never comes."""
    tmp, port = service["dir"], free_port()
    ranks = [start("consume", tmp / "tp", *service["common"], "parallel.tp=2", "data.base_resolution=640",
                   "train.steps=3",
                   env={"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    try:
        errors = [proc.communicate(timeout=300)[1] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, err) in enumerate(zip(ranks, errors)):
        assert proc.returncode == 2 and "data.base_resolution: trainer 640, service 256" in err, \
            f"TP rank {rank}: exit {proc.returncode}\n{err[-3000:]}"
    assert service_status(service)["counters"]["resets"] == 0
