"""Prompt features are cached in bf16 by default (cache.feature_dtype); fp32 caches still read.

In-process: `mmdit produce`'s encoder writes bf16 features (with a CRC over the stored bytes) or
fp32 ones when asked; a segment written in fp32 (as every cache before this setting) reads
back as it is; a cache holding both serves batches, from the cache reader and the producer's
collate alike, with the promised shapes and dtypes whatever the order of its records; and the
trainer's step inputs come out in the compute dtype.
"""

import pytest
import torch
from badfiles import good_t2i, write_shard

from mmdit.cache.segment import stage_fingerprint
from mmdit.cache.store import DamagedRecord, LatentCache
from mmdit.config.data import DataConfig
from mmdit.config.loader import load_config
from mmdit.config.produce import CacheConfig, EncodersConfig
from mmdit.consumer.batch import StepInputs
from mmdit.dataservice.plan import PlannedBatch
from mmdit.dataservice.server import collate

BUCKET = (64, 64)


def record(key: str, dtype: torch.dtype, tokens: int, dim: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"key": key, "fingerprint": "fp_dtype", "bucket": BUCKET, "task": "t2i", "caption": key, "source": "s",
            "latents": torch.randn(16, 8, 8, generator=g),
            "prompt_embeds": torch.randn(tokens, dim, generator=g).to(dtype)}


def test_the_default_is_bf16_and_only_bf16_or_fp32_are_accepted():
    assert CacheConfig().feature_dtype == "bf16"
    assert load_config(["cache.feature_dtype=fp32"]).cache.feature_dtype == "fp32"
    with pytest.raises(Exception, match="cache.feature_dtype must be one of bf16, fp32"):
        load_config(["cache.feature_dtype=fp16"])


@pytest.mark.parametrize("feature_dtype, want", [(None, torch.bfloat16), ("fp32", torch.float32)])
def test_produce_stores_features_in_the_configured_dtype(tmp_path, tiny_encoders_dir, feature_dtype, want):
    from mmdit.producer.encoders import Encoders
    from mmdit.producer.produce import produce

    write_shard(tmp_path / "web-000000.tar", [good_t2i(0), good_t2i(1, 64, 96)])
    encoders = Encoders.load(EncodersConfig(dir=tiny_encoders_dir))
    cache_cfg = CacheConfig(dir=str(tmp_path / "cache"), **({"feature_dtype": feature_dtype} if feature_dtype else {}))
    report = produce(DataConfig(shards=[str(tmp_path / "*.tar")], base_resolution=64), cache_cfg, encoders,
                     progress=False)
    assert report["encoded"] == 2
    cache = LatentCache(tmp_path / "cache")
    fp = stage_fingerprint(encoders.fingerprint, 64)
    assert fp == report["fingerprint"]  # the storage dtype is not part of the fingerprint
    for key in cache.keys(fp):
        rec = cache.read(key, fp)  # checked against its CRC
        assert rec["prompt_embeds"].dtype == want and rec["latents"].dtype == torch.float32
        direct = encoders.encode_prompts([rec["caption"]])[0]
        torch.testing.assert_close(rec["prompt_embeds"], direct.to(want))  # the encoder's features, rounded once


def test_a_bf16_record_checksums_its_stored_bytes(tmp_path):
    cache = LatentCache(tmp_path)
    cache.write([record("a", torch.bfloat16, 5)])
    (path,) = cache.segment_paths("fp_dtype")
    seg_tensors = cache._locate("a", "fp_dtype")[0].tensors
    _, shape, offset = seg_tensors["prompt_embeds"]
    assert seg_tensors["prompt_embeds"][0] == torch.bfloat16 and shape == (5, 8)
    assert cache.verify()["damaged_records"] == {}
    data = bytearray(open(path, "rb").read())
    data[offset + 3] ^= 0x01  # one bit of one bf16 feature
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedRecord, match="checksum mismatch"):
        LatentCache(tmp_path).read("a", "fp_dtype")


def test_records_of_both_dtypes_in_one_write_are_stored_in_fp32_with_valid_checksums(tmp_path):
    recs = [record("a", torch.bfloat16, 4), record("b", torch.float32, 3, seed=1)]
    LatentCache(tmp_path).write(recs)
    for rec, got in zip(recs, LatentCache(tmp_path).read_many(["a", "b"], "fp_dtype")):
        assert got["prompt_embeds"].dtype == torch.float32
        assert torch.equal(got["prompt_embeds"], rec["prompt_embeds"].float())


def mixed_cache(tmp_path) -> tuple[LatentCache, dict[str, dict]]:
    """An fp32 segment (a cache written before cache.feature_dtype) and a bf16 one, one bucket."""
    old = [record(f"old{i}", torch.float32, 3 + i, seed=i) for i in range(3)]
    new = [record(f"new{i}", torch.bfloat16, 2 + 2 * i, seed=10 + i) for i in range(3)]
    cache = LatentCache(tmp_path)
    cache.write(old)
    cache.write(new)
    return cache, {r["key"]: r for r in old + new}


def test_fp32_and_bf16_segments_read_back_as_stored(tmp_path):
    cache, want = mixed_cache(tmp_path)
    found, problems = cache.read_available(list(want), "fp_dtype")
    assert problems == {}
    for key, rec in found.items():
        assert rec["prompt_embeds"].dtype == want[key]["prompt_embeds"].dtype
        assert torch.equal(rec["prompt_embeds"], want[key]["prompt_embeds"])
        assert torch.equal(rec["latents"], want[key]["latents"])


@pytest.mark.parametrize("keys", [["old0", "new1", "old2", "new2"], ["new2", "old1", "new0"], ["old0", "new1", "old0"]])
def test_a_mixed_batch_is_fp32_exact_zero_padded_in_any_order(tmp_path, keys):
    cache, want = mixed_cache(tmp_path)
    lengths = [want[k]["prompt_embeds"].shape[0] for k in keys]
    planned = PlannedBatch(0, 0, BUCKET, "t2i", None, tuple(keys), 0)
    from_reader = cache.read_batch(keys, "fp_dtype")
    from_producer = collate(cache.read_many(keys, "fp_dtype"), planned, seq=0, gen=0, producer="p")
    for batch in (from_reader, from_producer):
        assert batch["prompt_embeds"].dtype == torch.float32 and batch["latents"].dtype == torch.float32
        assert tuple(batch["prompt_embeds"].shape) == (len(keys), max(lengths), 8)
        assert batch["prompt_mask"].sum(1).tolist() == lengths
        for j, key in enumerate(keys):
            n = lengths[j]
            assert torch.equal(batch["prompt_embeds"][j, :n], want[key]["prompt_embeds"].float())
            assert not batch["prompt_embeds"][j, n:].any()
            assert torch.equal(batch["latents"][j], want[key]["latents"])


def test_a_bf16_batch_stays_bf16_and_the_step_takes_the_compute_dtype(tmp_path):
    cache, want = mixed_cache(tmp_path)
    keys = ["new2", "new0"]
    planned = PlannedBatch(0, 0, BUCKET, "t2i", None, tuple(keys), 0)
    for batch in (cache.read_batch(keys, "fp_dtype"), collate(cache.read_many(keys, "fp_dtype"), planned, seq=0, gen=0,
                                                                  producer="p")):
        assert batch["prompt_embeds"].dtype == torch.bfloat16 and batch["latents"].dtype == torch.float32
        assert not batch["prompt_embeds"][1, 2:].any()  # new0 has 2 tokens, new2 has 6
        step = StepInputs.from_batch(batch, "cpu", torch.float32)
        assert step.txt.dtype == torch.float32 and step.x0.dtype == torch.float32
        assert torch.equal(step.txt[0], want["new2"]["prompt_embeds"].float())
