"""Builders for real image files and webdataset shards, good and bad, used by the producer tests."""

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image, ImageDraw


def gradient(w, h, seed=0):
    """A textured RGB image (so blur/entropy scores are non-trivial), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256], -1)
    a = (a + rng.integers(0, 40, size=a.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def shapes(seed, w=256, h=256):
    """Coloured ellipses on a plain background: structure a perceptual hash can hold on to."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = int(rng.integers(20, 120)), int(rng.integers(20, 120))
        draw.ellipse([x, y, x + dx, y + dy], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width, height, bit_depth, color_type, rows: bytes = b"") -> bytes:
    """A PNG written byte by byte: for what PIL cannot save (16-bit RGB, lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def rgb16_png(w, h):
    a = np.zeros((h, w, 3), dtype=">u2")
    a[..., 0] = 65535  # pure red at full 16-bit range
    a[..., 2] = np.linspace(0, 65535, w, dtype=np.uint16)[None, :]
    rows = b"".join(b"\x00" + a[r].tobytes() for r in range(h))
    return raw_png(w, h, 16, 2, rows)


def bomb_png():
    """A 60-byte PNG whose header claims 50000x50000 RGB (7.5 GB decoded)."""
    return raw_png(50000, 50000, 8, 2, b"\x00" * 16)


def corrupt_jpeg(w=96, h=96):
    data = encode(gradient(w, h, seed=9), "JPEG", quality=90)
    return data[: len(data) * 6 // 10]


def write_shard(path, samples):
    """samples: list of (key, {ext: bytes}); members written in order, like webdataset's writer."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))


def good_t2i(i, w=96, h=64):
    return f"good{i:04d}", {"png": encode(shapes(i, w, h)), "txt": f"good sample {i}".encode()}
