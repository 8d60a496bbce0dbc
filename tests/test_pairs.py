"""Preference pairs as data (Diffusion-DPO): `mmdit synth`'s pairs and hand-made ones through
`mmdit produce` into pair records (the rejected image in the preferred one's bucket, the prompt
once), a pair with one unreadable or missing image counted and skipped as a unit, the plan
drawing each pair once per epoch as one sample, and the served batch as the objective reads it."""

import io
import json

import pytest
import torch
from badfiles import corrupt_jpeg, encode, shapes, write_shard
from PIL import Image

from mmdit.cache import LatentCache, assign_bucket, bucket_set, read_manifest
from mmdit.config.data import DataConfig, FilterConfig
from mmdit.config.produce import CacheConfig, EncodersConfig, SynthConfig
from mmdit.producer.encoders import Encoders
from mmdit.producer.produce import produce
from mmdit.producer.synth.shards import make_pair

BASE = 64
KEYS = [f"pairs-000000/{k}" for k in ("00000000", "00000001", "00000002", "aspect")]


def test_synth_pairs_render_the_text_and_a_corrupted_string():
    cfg = SynthConfig(pairs=True, min_side=96, max_side=128, seed=3)
    for index in range(3):
        sample = make_pair(index, cfg)
        meta = json.loads(sample["json"])
        assert meta["task"] == "pair" and meta["rule"] == "text_correct"
        assert meta["text"] in sample["txt"].decode()  # the prompt quotes the preferred text
        assert meta["lose_text"] != meta["text"] and len(meta["lose_text"]) == len(meta["text"])
        win, lose = (Image.open(io.BytesIO(sample[m])) for m in ("win.png", "lose.png"))
        assert win.size == lose.size and win.tobytes() != lose.tobytes()
        assert make_pair(index, cfg) == sample  # a pure function of (seed, index)



def test_pair_shards_are_named_apart_from_renderings(tmp_path):
    """A key is the shard's stem and the sample's: pairs must not take the keys of the renderings
    `mmdit synth` wrote with the same seed into one cache (they would pass for cached)."""
    from mmdit.producer.synth.shards import write_shards

    [pairs] = write_shards(str(tmp_path), SynthConfig(pairs=True, num_samples=1, min_side=96, max_side=128))
    [plain] = write_shards(str(tmp_path), SynthConfig(num_samples=1, min_side=96, max_side=128))
    assert pairs.endswith("pairs-000000.tar") and plain.endswith("synth-000000.tar")


@pytest.fixture(scope="module")
def produced(tmp_path_factory, tiny_encoders_dir):
    d = tmp_path_factory.mktemp("pairs")
    synth = SynthConfig(pairs=True, min_side=96, max_side=128, seed=1)
    pairs = [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"})
             for s in (make_pair(i, synth) for i in range(3))]
    lose_tall = shapes(8, 64, 96)
    pairs += [
        ("aspect", {"win.png": encode(shapes(7, 96, 64)), "lose.png": encode(lose_tall), "txt": b"wide ellipses"}),
        ("badlose", {"win.png": encode(shapes(9, 80, 80)), "lose.jpg": corrupt_jpeg(), "txt": b"bad rejected image"}),
        ("nolose", {"win.png": encode(shapes(10, 80, 80)), "txt": b"no rejected image"}),
    ]
    write_shard(d / "pairs-000000.tar", pairs)
    encoders = Encoders.load(EncodersConfig(dir=tiny_encoders_dir))
    data = DataConfig(shards=[str(d / "pairs-000000.tar")], base_resolution=BASE,
                      filters=FilterConfig(min_side=0, drop_duplicates=False))
    report = produce(data, CacheConfig(dir=str(d / "cache")), encoders, progress=False)
    return {"dir": d / "cache", "report": report, "encoders": encoders, "lose_tall": lose_tall}


def test_pairs_become_one_record_each_and_a_bad_pair_is_skipped_whole(produced):
    report, cache = produced["report"], LatentCache(produced["dir"])
    assert report["seen"] == 6 and report["accepted"] == report["encoded"] == 4
    assert report["tasks"] == {"pair": 4}
    assert report["errors"] == {"corrupt_image": 1, "pair_image_missing": 1}
    fp = report["fingerprint"]
    keys = set(cache.keys(fp))
    assert keys == set(KEYS)  # no half of a bad pair
    status = {r["key"]: r["status"] for r in read_manifest(produced["dir"] / "manifest").to_pylist()}
    assert status["pairs-000000/badlose"] == "corrupt_image" and status["pairs-000000/nolose"] == "pair_image_missing"
    found, _ = cache.read_available(sorted(keys), fp)
    for rec in found.values():
        assert rec["task"] == "pair" and rec["cond_latents"].shape == rec["latents"].shape
        assert not torch.equal(rec["cond_latents"], rec["latents"])


def test_a_pair_of_two_aspects_goes_to_the_preferred_images_bucket(produced):
    report, cache, encoders = produced["report"], LatentCache(produced["dir"]), produced["encoders"]
    bucket = assign_bucket(96, 64, bucket_set(BASE))
    assert bucket != assign_bucket(64, 96, bucket_set(BASE))  # the rejected image alone would go elsewhere
    rec = cache.read_available([KEYS[-1]], report["fingerprint"])[0][KEYS[-1]]
    assert tuple(rec["bucket"]) == bucket
    lose = encoders.encode_images(encoders.preprocess_image(produced["lose_tall"], bucket)[None])[0]
    torch.testing.assert_close(rec["cond_latents"], lose.float(), atol=1e-5, rtol=1e-5)


def test_the_plan_draws_each_pair_once_and_the_batch_reaches_the_objective_as_win_and_lose(produced):
    from mmdit.consumer.dpo import PairInputs
    from mmdit.dataservice.plan import DataVersion, EpochPlanner, PlanSpec
    from mmdit.dataservice.selection import build_selection, resolve_fingerprint, resolve_stages
    from mmdit.dataservice.server import collate
    from mmdit.model.mmdit import pack_latents

    cache = LatentCache(produced["dir"])
    fp = resolve_fingerprint(cache, "")
    selection, _ = build_selection(cache, resolve_stages(cache, fp))
    default = DataConfig()
    assert not selection.weights(DataVersion(0, 0, 0, task_weights=default.task_weights)).any()  # pairs weigh 0
    planner = EpochPlanner(PlanSpec(seed=0, global_batch_size=2), 0, selection,
                           [DataVersion(0, 0, 0, task_weights={"pair": 1.0})])
    drawn, batches = [], []
    while (batch := planner.next()) is not None:
        assert batch.task == "pair" and batch.cond_bucket == batch.bucket
        drawn += batch.keys
        batches.append(batch)
    assert sorted(drawn) == KEYS  # each once, as one sample
    planned = batches[0]
    records = [cache.read_available([k], fp)[0][k] for k in planned.keys]
    served = collate(records, planned, seq=0, gen=0, producer="test")
    inputs = PairInputs.from_batch(served, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(inputs.x0_win, pack_latents(torch.stack([r["latents"] for r in records])).float())
    torch.testing.assert_close(inputs.x0_lose, pack_latents(torch.stack([r["cond_latents"] for r in records])).float())
