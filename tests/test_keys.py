"""Sample keys: a tar member's name never becomes a key that could name a path outside its shard.

The rule (cache/keys.py) is checked at ingest (counted as `bad_key`, named, never yielded),
and again wherever a key is stored: the cache, the manifest, a segment's header read back.
"""

import os
import posixpath
import tempfile
from pathlib import Path

import pytest
import torch
from badfiles import encode, good_t2i, shapes, write_members, write_shard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webdataset.tariterators import base_plus_ext

from mmdit.cache.keys import BAD_KEY, key_problem
from mmdit.cache.manifest import ManifestWriter
from mmdit.cache.segment import encode_segment
from mmdit.cache.store import LatentCache
from mmdit.producer.ingest import ErrorLog, samples, tar_samples
from mmdit.utils.atomic import atomic_write_bytes

GOOD = ["shard/000001", "shard/./000001", "shard/a/b/c", "s/中文 键", "k003", "shard/x#reconstruction", "s/a.b"]
BAD = {
    "": "empty", "shard/../../x": "..", "shard//tmp/abs": "empty component", "/abs": "absolute",
    "shard/": "empty component", "..": "..", "shard/..": "..", "a\\b": "backslash", "a\x00b": "control",
    "a\x1fb": "control", "a\x7fb": "control", "a\x85b": "control", "a\udcffb": "undecodable",
}


@pytest.mark.parametrize("key", GOOD)
def test_ordinary_keys_pass(key):
    assert key_problem(key) is None


@pytest.mark.parametrize("key", sorted(BAD))
def test_keys_that_could_leave_their_shard_are_refused_with_the_reason(key):
    assert BAD[key] in key_problem(key)


def stays_inside(key: str) -> bool:
    """Joined to a root, does the key name a path strictly inside `root/<its first component>`?"""
    root = "/root"
    path = posixpath.normpath(posixpath.join(root, key))
    shard = posixpath.join(root, key.split("/", 1)[0])
    return path.startswith(shard + "/") or path == shard


MEMBERS = [
    ("ok.png", encode(shapes(1, 64, 64))), ("ok.txt", b"a good sample"),
    ("../../escape.png", encode(shapes(2, 64, 64))), ("../../escape.txt", b"climbs out of its shard"),
    ("/tmp/abs.png", encode(shapes(3, 64, 64))), ("/tmp/abs.txt", b"an absolute path"),
    ("a//b.png", encode(shapes(4, 64, 64))),
    ("back\\slash.png", encode(shapes(5, 64, 64))),
    ("ctl\x01x.png", encode(shapes(6, 64, 64))),
    ("raw\udcffbyte.png", encode(shapes(7, 64, 64))),  # written as the byte 0xff: not UTF-8
    ("sub/../up.png", encode(shapes(8, 64, 64))),
    ("./dot.png", encode(shapes(9, 64, 64))), ("./dot.txt", b"tar -C dir . writes names like this"),
    ("ok2.png", encode(shapes(10, 64, 64))), ("ok2.txt", b"another good sample"),
]


def test_tar_members_with_bad_names_are_counted_named_and_never_yielded(tmp_path):
    shard = tmp_path / "web-000000.tar"
    write_members(shard, MEMBERS)
    errors = ErrorLog()
    keys = [raw["__key__"] for raw in tar_samples([str(shard)], errors)]
    assert keys == ["ok", "./dot", "ok2"]
    assert errors.counts == {BAD_KEY: 7}  # once per sample, not per member
    named = [e.key for e in errors.errors]
    assert named == ["web-000000/../../escape", "web-000000//tmp/abs", "web-000000/a//b", "web-000000/back\\slash",
                     "web-000000/ctl\x01x", "web-000000/raw\udcffbyte", "web-000000/sub/../up"]
    assert all(e.url == str(shard) and e.reason == BAD_KEY for e in errors.errors)
    assert "'web-000000/../../escape'" in str(errors.errors[0])  # repr: control bytes stay visible in a log
    decoded = list(samples(str(shard), ErrorLog()))
    assert [s["key"] for s in decoded] == ["web-000000/ok", "web-000000/./dot", "web-000000/ok2"]


def test_a_key_that_arrives_by_another_route_is_refused_by_every_store(tmp_path):
    bad = "web-000000/../../x"
    g = torch.Generator().manual_seed(0)
    rec = {"key": bad, "fingerprint": "fp", "bucket": (16, 16), "task": "t2i", "caption": "c", "source": "s",
           "latents": torch.randn(16, 2, 2, generator=g), "prompt_embeds": torch.randn(2, 4, generator=g)}
    cache = LatentCache(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"\.\."):
        cache.write([rec])
    with pytest.raises(ValueError, match=r"\.\."):
        ManifestWriter(tmp_path / "manifest").add({"key": bad, "status": "ok"})
    # a segment written by something else (an old version, a hand-made file) with such a key
    good = {**rec, "key": "web-000000/fine"}
    seg = tmp_path / "cache" / "fp" / "16x16" / "seg-foreign-000001.safetensors"
    seg.parent.mkdir(parents=True)
    atomic_write_bytes(seg, encode_segment("fp", (16, 16), [good, rec]))
    reader = LatentCache(tmp_path / "cache")
    assert reader.keys("fp") == [] and ".." in reader.damage[str(seg)]
    report = reader.verify(repair=True)
    assert str(seg) in report["damaged_segments"] and report["unrepaired"] == {}
    assert LatentCache(tmp_path / "cache").verify()["damaged_segments"] == {}


def test_produce_counts_bad_keys_and_stores_only_safe_ones(tmp_path, tiny_encoders_dir):
    from mmdit.cache.manifest import read_manifest
    from mmdit.config.data import DataConfig
    from mmdit.config.produce import CacheConfig, EncodersConfig
    from mmdit.producer.encoders import Encoders
    from mmdit.producer.produce import produce

    shards = tmp_path / "shards"
    shards.mkdir()
    write_members(shards / "web-000000.tar", MEMBERS[:6])
    write_shard(shards / "web-000001.tar", [good_t2i(11, 64, 64)])
    data = DataConfig(shards=[str(shards / "*.tar")], base_resolution=64, encode_batch_size=4, decode_workers=1)
    report = produce(data, CacheConfig(dir=str(tmp_path / "cache")), Encoders.load(EncodersConfig(dir=tiny_encoders_dir)),
                     progress=False)
    assert report["errors"] == {BAD_KEY: 2} and report["seen"] == 4 and report["accepted"] == 2
    assert report["first_bad_key"].startswith("'web-000000/../../escape' in ")
    manifest = read_manifest(tmp_path / "cache" / "manifest")["key"].to_pylist()
    cached = LatentCache(tmp_path / "cache").keys(report["fingerprint"])
    assert sorted(manifest) == sorted(cached) == ["web-000000/ok", "web-000001/good0011"]


NAME_PARTS = st.sampled_from(["a", "b7", ".", "..", "", "/", "//", "\\", "\x01", "\x7f", " ", "中", "\udcfe", "x.y"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(st.lists(NAME_PARTS, min_size=1, max_size=6).map("".join), min_size=1, max_size=6))
def test_fuzzed_member_names_never_yield_a_key_outside_its_shard(names):
    with tempfile.TemporaryDirectory() as tmp:
        shard = os.path.join(tmp, "fuzz-000000.tar")
        write_members(shard, [(f"{name}.txt", b"caption") for name in names])
        errors = ErrorLog()
        raws = list(tar_samples([shard], errors))
    for raw in raws:
        key = f"fuzz-000000/{raw['__key__']}"
        assert key_problem(key) is None and stays_inside(key), key
        key.encode("utf-8")  # storable in JSON and Parquet as it is
    # nothing vanishes without a trace: each member is yielded, or refused (counted and named), or
    # is not a sample's member at all (webdataset's split finds no key, or a hidden file)
    expected_yielded, expected_refused = set(), set()
    for name in names:
        key, _ = base_plus_ext(f"{name}.txt")
        if key is None or Path(key).name.startswith("."):
            continue
        (expected_refused if key_problem(f"fuzz-000000/{key}") else expected_yielded).add(key)
    assert {raw["__key__"] for raw in raws} == expected_yielded
    assert {e.key.split("/", 1)[1] for e in errors.errors} == expected_refused
    assert set(errors.counts) <= {BAD_KEY}
