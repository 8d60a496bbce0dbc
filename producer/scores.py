"""Per-sample quality scores, computed once at ingest and stored in the manifest.

Scores, not verdicts: the thresholds live in `FilterConfig` and are applied to the stored scores
(cache/manifest.py), so a changed threshold takes effect without decoding anything again.

Image statistics are measured on a thumbnail whose longer side is `SCORE_SIDE` pixels, which
keeps scoring cheap (a few ms) and makes blur comparable across resolutions; width, height and
aspect are the original's. All numpy, no Python loops over pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SCORE_SIDE = 256
SCORE_FIELDS = (
    "width", "height", "aspect", "blur", "brightness", "saturation", "contrast", "entropy", "phash",
    "caption_chars", "text_chars",
)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


_DCT32 = _dct_matrix(32)
_BITS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def thumbnail(img: Image.Image, side: int = SCORE_SIDE) -> Image.Image:
    w, h = img.size
    s = side / max(w, h)
    if s >= 1.0:
        return img
    # reduce by a box filter to about the target first (cheap), then resample: scores need no finer
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR, reducing_gap=1.0)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a [H, W] grey image in 0..255: low means blurry."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4.0 * grey[1:-1, 1:-1]
    return float(lap.var())


def entropy(grey_u8: np.ndarray) -> float:
    """Shannon entropy (bits, 0..8) of the grey-level histogram: 0 for a flat image."""
    p = np.bincount(grey_u8.ravel(), minlength=256).astype(np.float64)
    p = p[p > 0] / grey_u8.size
    return float(-(p * np.log2(p)).sum())


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash (DCT of a 32x32 grey image, low 8x8 band vs its median) as a
    signed int64, so near-identical images (re-encoded, resized) share it."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    d = (_DCT32 @ a @ _DCT32.T)[:8, :8].ravel()
    bits = d > np.median(d[1:])
    packed = np.bitwise_or.reduce(_BITS[bits]) if bits.any() else np.uint64(0)
    return int(np.uint64(packed).view(np.int64))


def score_image(img: Image.Image) -> dict:
    """Scores of one RGB image (see SCORE_FIELDS)."""
    w, h = img.size
    small = thumbnail(img)
    rgb = np.asarray(small)  # [h, w, 3] uint8
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    grey = r * np.float32(_LUMA[0]) + g * np.float32(_LUMA[1]) + b * np.float32(_LUMA[2])  # float32, 0..255
    mx = np.maximum(np.maximum(r, g), b)
    chroma = (mx - np.minimum(np.minimum(r, g), b)).astype(np.float32)
    sat = np.divide(chroma, mx, out=np.zeros_like(chroma), where=mx > 0)
    return {
        "width": w,
        "height": h,
        "aspect": w / h,
        "blur": laplacian_variance(grey),
        "brightness": float(grey.mean() / 255.0),
        "saturation": float(sat.mean()),
        "contrast": float(grey.std() / 255.0),
        "entropy": entropy((grey + 0.5).astype(np.uint8)),
        "phash": phash(small),
    }


def score_sample(sample: dict) -> dict:
    """Scores of a decoded sample (producer/ingest.py): its target image plus caption and task."""
    s = score_image(sample["image"])
    s["caption_chars"] = len(sample["caption"])
    text = (sample.get("meta") or {}).get("text", "")
    s["text_chars"] = len(text) if isinstance(text, str) else 0
    s["task"] = sample["task"]
    if sample.get("source_image") is not None:
        s["src_width"], s["src_height"] = sample["source_image"].size
    return s
