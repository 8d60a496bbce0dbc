"""Builders for real image files and webdataset shards, good and bad, and for directory entries
that are not regular files (FIFOs, sockets, devices), used by the producer and cache tests."""

import io
import os
import stat
import struct
import tarfile
import threading
import zlib
from pathlib import Path

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


def write_members(path, members):
    """A tar of (member name, bytes) with the names exactly as given: for names no webdataset
    writer produces (`../x.jpg`, `/abs.jpg`, control characters, undecodable bytes given as
    surrogate escapes, which are written as the raw bytes)."""
    with tarfile.open(path, "w", encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- files that are not files


def make_socket_file(path):
    """A socket inode at `path` (mknod needs no privilege for sockets, and no path-length limit
    applies, unlike bind)."""
    os.mknod(path, 0o644 | stat.S_IFSOCK)
    return Path(path)


def make_char_device(path):
    """A character device like /dev/null at `path`, or None where mknod is not allowed."""
    try:
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        return None
    return Path(path)


class FifoWatch:
    """FIFOs that code under test must never open.

    Opening a FIFO to read blocks until a writer comes, so a reader that opens one hangs its test
    forever. This watcher plays the writer: a thread opens each watched FIFO's write end without
    blocking (which succeeds only while a reader has it open), records the path and closes it
    again, so the reader sees end-of-file and goes on. A bug then fails its test (`opened` is not
    empty) instead of hanging the suite."""

    def __init__(self):
        self.paths: list[Path] = []
        self.opened: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fifo-watch", daemon=True)
        self._thread.start()

    def make(self, path) -> Path:
        os.mkfifo(path)
        self.paths.append(Path(path))
        return Path(path)

    def _run(self):
        while not self._stop.wait(0.005):
            for path in list(self.paths):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader; ENOENT: moved away
                    continue
                self.opened.append(str(path))
                os.close(fd)

    def close(self):
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
