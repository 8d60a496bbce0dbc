"""Categories (where a sample's comes from, the produce report, weights in the plan) and
near-duplicate removal by perceptual hash across shards."""

import io
import json
import random

import numpy as np
import pyarrow as pa
import pytest
from badfiles import encode, shapes, write_shard
from PIL import Image, ImageEnhance

from mmdit.cache.categories import CategoryError, from_ingest, normalize
from mmdit.cache.manifest import PhashIndex, hamming, read_manifest, select_mask
from mmdit.cache.store import LatentCache
from mmdit.config.data import DataConfig, FilterConfig
from mmdit.config.produce import CacheConfig, EncodersConfig
from mmdit.dataservice.plan import DataVersion
from mmdit.dataservice.selection import build_selection, resolve_fingerprint, resolve_stages
from mmdit.producer.encoders import Encoders
from mmdit.producer.produce import produce
from mmdit.producer.scores import phash

BASE = 64


@pytest.fixture(scope="module")
def encoders(tiny_encoders_dir):
    return Encoders.load(EncodersConfig(dir=tiny_encoders_dir))


# ----------------------------------------------------------------------------- near duplicates


@pytest.mark.parametrize("seed", range(6))
def test_the_phash_index_agrees_with_brute_force(seed):
    rng = random.Random(seed)
    distance = rng.randint(0, 10)
    index, kept = PhashIndex(distance), []
    for _ in range(400):
        if kept and rng.random() < 0.5:  # a near copy: a kept hash with a few bits flipped
            h = rng.choice(kept)
            for bit in rng.sample(range(64), rng.randint(0, 2 * distance + 2)):
                h ^= 1 << bit
        else:
            h = rng.getrandbits(64)
        h = int(np.uint64(h & (2**64 - 1)).view(np.int64))  # signed, as the manifest stores it
        expected = any(hamming(h, k) <= distance for k in kept)
        assert index.near(h) == expected
        if not expected:
            index.add(h)
            kept.append(h)


def test_selection_drops_near_duplicates_at_the_configured_distance():
    base = random.Random(0).getrandbits(63)
    hashes = [base, base ^ 0b1, base ^ 0b111, base ^ (0b1111111 << 20), base]  # distances 0, 1, 3, 7, 0
    table = pa.table({"key": [f"k{i}" for i in range(5)], "status": ["ok"] * 5, "width": [512] * 5,
                      "height": [512] * 5, "caption_chars": [10] * 5, "phash": pa.array(hashes, pa.int64())})
    for distance, kept in ((0, [1, 1, 1, 1, 0]), (1, [1, 0, 1, 1, 0]), (3, [1, 0, 0, 1, 0]), (8, [1, 0, 0, 0, 0])):
        mask, reasons = select_mask(table, FilterConfig(duplicate_distance=distance))
        assert mask.astype(int).tolist() == kept, distance
        assert set(reasons[~mask]) <= {"duplicate"}
    assert select_mask(table, FilterConfig(drop_duplicates=False))[0].all()


def recaptured(img: Image.Image) -> bytes:
    """The same picture as a crawl meets it again: cropped a little, brighter, 75% size, JPEG."""
    w, h = img.size
    img = ImageEnhance.Brightness(img.crop((3, 2, w - 2, h - 3))).enhance(1.08)
    return encode(img.resize((w * 3 // 4, h * 3 // 4), Image.BICUBIC), "JPEG", quality=70)


def test_near_duplicates_across_shards_are_dropped_and_counted(tmp_path, encoders):
    originals = [shapes(i, 96, 96) for i in range(8)]
    write_shard(tmp_path / "a-000.tar", [(f"o{i}", {"png": encode(img), "txt": b"a picture of shapes"})
                                         for i, img in enumerate(originals)])
    write_shard(tmp_path / "b-000.tar", [(f"c{i}", {"jpg": recaptured(img), "txt": b"shapes again"})
                                         for i, img in enumerate(originals)])
    copies = [Image.open(io.BytesIO(recaptured(img))).convert("RGB") for img in originals]
    near = sum(hamming(phash(a), phash(b)) <= 8 for a, b in zip(originals, copies))
    exact = sum(phash(a) == phash(b) for a, b in zip(originals, copies))
    assert near >= 6 and exact < near  # the copies are near, mostly not exact, duplicates
    reports = {}
    for distance in (0, 8):
        data = DataConfig(shards=[str(tmp_path / "*.tar")], base_resolution=BASE,
                          filters=FilterConfig(min_side=0, duplicate_distance=distance))
        reports[distance] = produce(data, CacheConfig(dir=str(tmp_path / f"cache{distance}")), encoders, progress=False)
    assert reports[0]["rejected"].get("duplicate", 0) == exact
    assert reports[8]["rejected"]["duplicate"] == near
    assert reports[8]["accepted"] == 16 - near
    table = read_manifest(tmp_path / "cache8" / "manifest")
    mask, reasons = select_mask(table, FilterConfig(min_side=0, duplicate_distance=8))
    assert int((reasons == "duplicate").sum()) == near  # the plan's selection agrees with the producer


# ----------------------------------------------------------------------------- categories


def test_category_names_and_where_they_come_from():
    assert normalize(" Text rendering ") == normalize("TEXT-RENDERING") == "text_rendering"
    for bad in ("animals", "", 3):
        with pytest.raises(CategoryError):
            normalize(bad)
    table = {"web": "nature"}
    assert from_ingest({"category": "People"}, "web", table) == ("people", "metadata")
    assert from_ingest({"category": "bogus"}, "web", table) == ("nature", "source")  # never guessed
    assert from_ingest({}, "other", table) == ("", "")


def test_categories_reach_the_report_the_manifest_and_the_plan(tmp_path, encoders):
    samples = []
    for i in range(12):
        meta = {"category": "People"} if i % 3 == 0 else {"category": "not-a-category"} if i % 3 == 1 else {}
        samples.append((f"s{i}", {"png": encode(shapes(i, 96, 96)), "txt": b"a picture",
                                  "json": json.dumps(meta).encode()}))
    write_shard(tmp_path / "web-000.tar", samples)
    data = DataConfig(shards=[str(tmp_path / "web-000.tar")], base_resolution=BASE, source_categories={"web": "Nature"},
                      filters=FilterConfig(min_side=0, drop_duplicates=False))
    cache_dir = tmp_path / "cache"
    report = produce(data, CacheConfig(dir=str(cache_dir)), encoders, progress=False)
    assert report["categories"] == {"people": 4, "nature": 8}
    rows = {r["key"]: r for r in read_manifest(cache_dir / "manifest").to_pylist()}
    assert {(r["category"], r["category_source"]) for r in rows.values()} == {("people", "metadata"),
                                                                              ("nature", "source")}
    cache = LatentCache(cache_dir)
    fp = resolve_fingerprint(cache, "")
    selection, _ = build_selection(cache, resolve_stages(cache, fp))
    no_people = selection.weights(DataVersion(0, 0, 0, category_weights={"people": 0.0}))
    drawn = {selection.refs[i].key for i in np.flatnonzero(no_people)}
    assert drawn == {k for k, r in rows.items() if r["category"] == "nature"}
