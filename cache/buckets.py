"""Resolution buckets: equal-area, multi-aspect (H, W) sets per curriculum stage, and assignment.

A batch must hold one shape (the MMDiT's MSRoPE tables are built per batch), so every image is
resized and centre-cropped to the bucket of its nearest aspect ratio. Each base resolution
(256 -> 640 -> 1328 in the curriculum) has one set of buckets with about base**2 pixels, sides
multiples of 16 (VAE scale 8 x patch 2). At 1328 the set uses Qwen-Image's native training sizes
(1328x1328, 1664x928, 1472x1104, 1584x1056 and transposes), so real data at those sizes is
never resampled.

The resize + centre crop itself is `mmdit.producer.encoders.preprocess_image` (its resampling
filter is part of the encoder fingerprint, so it lives with the encoders).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

SIDE_MULTIPLE = 16
BASE_RESOLUTIONS = (256, 640, 1328)
ASPECTS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1))
"""Landscape aspect ratios W:H; each also gives its portrait transpose."""
NATIVE_1328 = {(1, 1): (1328, 1328), (4, 3): (1104, 1472), (3, 2): (1056, 1584), (16, 9): (928, 1664)}
"""Qwen-Image's native sizes as (H, W) for their landscape aspect."""


def _round16(x: float) -> int:
    return max(SIDE_MULTIPLE, int(round(x / SIDE_MULTIPLE)) * SIDE_MULTIPLE)


@lru_cache(maxsize=None)
def bucket_set(base: int) -> tuple[tuple[int, int], ...]:
    """All (H, W) buckets of area ~base**2 for `base`, sorted by aspect W/H (portrait first)."""
    if base <= 0 or base % SIDE_MULTIPLE:
        raise ValueError(f"base resolution {base} must be a positive multiple of {SIDE_MULTIPLE}")
    area = base * base
    out = set()
    for aw, ah in ASPECTS:
        if base == 1328 and (aw, ah) in NATIVE_1328:
            h, w = NATIVE_1328[(aw, ah)]
        else:
            r = aw / ah
            h, w = _round16(math.sqrt(area / r)), _round16(math.sqrt(area * r))
        out.add((h, w))
        out.add((w, h))
    return tuple(sorted(out, key=lambda hw: hw[1] / hw[0]))


def assign_bucket(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket whose aspect is nearest the image's, measured in log aspect (so 2:1 and 1:2
    are equally far from 1:1); an exact size match wins outright."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if (height, width) in buckets:
        return (height, width)
    la = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - la))


def assign_buckets(widths: np.ndarray, heights: np.ndarray, buckets: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Vectorised `assign_bucket`: returns an [N, 2] int array of (H, W)."""
    b = np.asarray(buckets, dtype=np.int64)
    la = np.log(np.maximum(widths, 1) / np.maximum(heights, 1))[:, None]
    lb = np.log(b[:, 1] / b[:, 0])[None, :]
    idx = np.abs(la - lb).argmin(axis=1)
    exact = (np.asarray(heights)[:, None] == b[None, :, 0]) & (np.asarray(widths)[:, None] == b[None, :, 1])
    idx = np.where(exact.any(axis=1), exact.argmax(axis=1), idx)
    return b[idx]
