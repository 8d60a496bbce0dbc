"""Resolution buckets: the sets per curriculum stage, nearest-aspect assignment, resize + crop."""

import math

import numpy as np
import pytest
from PIL import Image

from mmdit.cache.buckets import BASE_RESOLUTIONS, assign_bucket, assign_buckets, bucket_set
from mmdit.producer.encoders import preprocess_image

NATIVE = [(1328, 1328), (928, 1664), (1104, 1472), (1056, 1584)]


@pytest.mark.parametrize("base", BASE_RESOLUTIONS)
def test_bucket_sets_are_equal_area_multiples_of_16_and_symmetric(base):
    buckets = bucket_set(base)
    assert len(buckets) == len(set(buckets)) >= 9
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert (w, h) in buckets
        tolerance = 0.13 if base == 1328 else 0.03  # the native 16:9 size is 12% under 1328**2
        assert abs(h * w / base**2 - 1) <= tolerance
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects) and min(aspects) <= 1 / 3 + 0.02 and max(aspects) >= 3 - 0.1
    assert (base, base) in buckets


def test_1328_has_qwen_image_native_sizes():
    buckets = bucket_set(1328)
    for h, w in NATIVE:
        assert (h, w) in buckets and (w, h) in buckets


@pytest.mark.parametrize("h, w", NATIVE + [(w, h) for h, w in NATIVE])
def test_native_sizes_map_to_themselves(h, w):
    assert assign_bucket(w, h, bucket_set(1328)) == (h, w)


def test_nearest_aspect_in_log_space():
    b256 = bucket_set(256)
    assert assign_bucket(1000, 500, b256) == (176, 368)  # 2:1 landscape
    assert assign_bucket(500, 1000, b256) == (368, 176)
    assert assign_bucket(777, 777, b256) == (256, 256)
    assert assign_bucket(4000, 100, b256) == (144, 448)  # beyond the widest: the widest
    # each image goes to the bucket with the smallest |log aspect difference|
    rng = np.random.default_rng(0)
    ws, hs = rng.integers(16, 4000, 300), rng.integers(16, 4000, 300)
    for base in BASE_RESOLUTIONS:
        buckets = bucket_set(base)
        got = assign_buckets(ws, hs, buckets)
        for (w, h), (bh, bw) in zip(zip(ws, hs), got):
            best = min(abs(math.log(w / h) - math.log(x / y)) for y, x in buckets)
            assert abs(math.log(w / h) - math.log(bw / bh)) == pytest.approx(best)
            assert (bh, bw) == assign_bucket(int(w), int(h), buckets)
    # the boundary between two buckets is the geometric mean of their aspects
    b1328 = bucket_set(1328)
    mid = math.sqrt((1584 / 1056) * (1664 / 928))  # geometric midpoint between 3:2 and 16:9
    assert assign_bucket(round(1000 * mid) - 3, 1000, b1328) == (1056, 1584)
    assert assign_bucket(round(1000 * mid) + 3, 1000, b1328) == (928, 1664)


def test_bad_inputs():
    with pytest.raises(ValueError):
        bucket_set(100)
    with pytest.raises(ValueError):
        assign_bucket(0, 10, bucket_set(256))


def test_resize_center_crop_to_bucket():
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    h, w = assign_bucket(*img.size, bucket_set(256))
    t = preprocess_image(img, (h, w))
    assert tuple(t.shape) == (3, h, w) and t.min() >= -1 and t.max() <= 1
    assert t[:, h // 2, w // 2].tolist() == [1.0, 1.0, 1.0]  # the centre survives the crop
    assert t[:, h // 2, 0].max() < 0  # the left edge is the black part
